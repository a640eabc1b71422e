"""``ConcurGate``: a compiled LangGraph graph, admission-controlled.

``await ConcurGate(graph, vllm_url=URL).abatch(inputs)`` runs one LangGraph run per input, all
started at once; the window, not a task limit, decides which agents may send LLM calls. The
gate rides in each run's callbacks (a :class:`ConcurCallbackHandler`), so every LLM call at any
depth, subgraphs included, is gated, and every agent's slot is released when its run ends, however
it ends.

Conventions, LangGraph's unless said otherwise:

* ``abatch`` returns outputs in input order; with ``return_exceptions=True`` an agent's
  exception takes its place in the list. Without it the first failure is raised, and (unlike
  ``Runnable.abatch``, whose other runs keep going unobserved) the other agents are cancelled
  first, so no run outlives the call and no slot outlives its agent;
* ``abatch_as_completed`` yields ``(index, output)`` as runs finish; leaving the loop early
  cancels the runs still going (close it with ``contextlib.aclosing`` to do so at once);
* each agent gets its own ``thread_id`` unless the caller gives one per input. One config with
  a ``thread_id`` for several inputs is refused: every agent would share one thread (one
  checkpoint history) and one slot;
* ``max_concurrency`` is never used for admission: it also limits the tasks inside each
  graph's super-steps. A ``max_concurrency`` the caller puts in a config is passed through to
  the graph untouched, for that meaning only;
* the synchronous methods (``invoke``, ``batch``, ``stream``) raise
  :class:`SyncInvocationError`: an admission wait must not block the thread.

Concurrent calls on one ``ConcurGate`` (``asyncio.gather`` of several ``ainvoke``) share one
session, so one window; the session (and its controller) starts with the first call and stops
after the last. ``async with ConcurGate(...) as gate:`` keeps one session across several calls.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Unpack

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.errors import GraphDrained
from langgraph.pregel import Pregel
from langgraph.runtime import RunControl

from concur_langgraph.core.law import ControlLaw
from concur_langgraph.errors import AgentDrainedError, ConfigError, SyncInvocationError
from concur_langgraph.integrations.callbacks import ConcurCallbackHandler
from concur_langgraph.integrations.durable import (
    AgentPlan,
    check_durable_kwargs,
    durable_config,
    durable_thread_id,
    plan_agent,
    require_checkpointer,
)
from concur_langgraph.integrations.node import gate_node
from concur_langgraph.integrations.progress import BatchProgress
from concur_langgraph.session.options import OtherSessionKwargs, SessionOptions
from concur_langgraph.session.session import ConcurSession
from concur_langgraph.session.statistics import SessionStatistics

__all__ = ["ConcurGate"]


def _new_thread_id() -> str:
    return str(uuid.uuid4())


def _with_handler(config: RunnableConfig, handler: ConcurCallbackHandler) -> RunnableConfig:
    callbacks = config.get("callbacks")
    new: Any
    if callbacks is None:
        new = [handler]
    elif isinstance(callbacks, list):
        new = [*callbacks, handler]
    elif isinstance(callbacks, BaseCallbackManager):
        new = callbacks.copy()
        new.add_handler(handler, inherit=True)
    else:
        raise ConfigError(f"callbacks: expected a list of handlers or a manager, got {callbacks!r}")
    out = RunnableConfig(**config)
    out["callbacks"] = new
    return out


def _with_thread(config: RunnableConfig, thread_id: str) -> RunnableConfig:
    out = RunnableConfig(**config)
    out["configurable"] = {**(config.get("configurable") or {}), "thread_id": thread_id}
    return out


def agent_configs(
    config: RunnableConfig | Sequence[RunnableConfig] | None,
    count: int,
    *,
    batch_id: str | None = None,
) -> list[tuple[RunnableConfig, str]]:
    """One config per agent, each with its own ``thread_id``, and that agent's id.

    A thread the caller does not name is new (a uuid), or, in a durable batch, the agent's
    durable thread ``f"{batch_id}/{index}"``. Raises :class:`ConfigError` (naming ``config``)
    when agents would share a thread.
    """

    def default_thread(index: int) -> str:
        return _new_thread_id() if batch_id is None else durable_thread_id(batch_id, index)

    if config is None or isinstance(config, dict):
        base = RunnableConfig(**(config or {}))
        given = (base.get("configurable") or {}).get("thread_id")
        if given is not None and count > 1:
            raise ConfigError(
                f"config: one config with configurable.thread_id={given!r} for {count} inputs "
                "would run every agent on one thread (one checkpoint history, one admission "
                "slot); pass a list of configs with one thread_id each, or leave thread_id "
                "out and ConcurGate gives each agent its own"
            )
        if base.get("run_id") is not None and count > 1:
            raise ConfigError(
                f"config: one run_id for {count} inputs; a run_id names one run, so pass a "
                "list of configs or leave run_id out"
            )
        out: list[tuple[RunnableConfig, str]] = []
        for index in range(count):
            thread_id = str(given) if given is not None else default_thread(index)
            out.append((_with_thread(base, thread_id), thread_id))
        return out
    configs = list(config)
    if len(configs) != count:
        raise ConfigError(
            f"config: got {len(configs)} configs for {count} inputs; give one config, or one "
            "per input"
        )
    seen: dict[str, int] = {}
    out = []
    for index, one in enumerate(configs):
        given = (one.get("configurable") or {}).get("thread_id")
        thread_id = str(given) if given is not None else default_thread(index)
        if thread_id in seen:
            raise ConfigError(
                f"config[{index}]: thread_id {thread_id!r} is also the thread_id of "
                f"config[{seen[thread_id]}]; each agent needs its own thread"
            )
        seen[thread_id] = index
        out.append((_with_thread(RunnableConfig(**one), thread_id), thread_id))
    return out


async def _settle(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel what is still running and wait until every task has finished unwinding.

    The outcomes nobody will read (the failures after the one raised, the results after the
    caller left) are retrieved here, so asyncio does not print each failure's traceback as
    "Task exception was never retrieved" when the task is collected.
    """
    for task in tasks:
        if not task.done():
            task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


class ConcurGate:
    """A compiled graph whose runs are admitted by the CONCUR gate.

    Args:
        graph: a compiled LangGraph graph (any ``Runnable`` with ``ainvoke``/``astream``).
        vllm_url: base URL(s) of the serving engine(s) whose ``/metrics`` drive the window
            (vLLM or SGLang, told apart by what the page exports; ``metrics_url`` is the same
            option under an engine-neutral name).
        law: the control law; ``None`` is ``FitLaw()`` (docs/laws.md), ``ConcurLaw()`` is
            the paper's. ``FixedLaw(k)`` needs no URL.
        checkpointer: a LangGraph saver for the graph's runs (``None``: the graph's own, if it
            was compiled with one). With one, ``abatch(..., batch_id=...)`` is durable.
        **options: the other session options (``interval_s``, ``min_window``, ``max_window``,
            ``initial_window``, ``max_rps``, ``admission_timeout_s``, ``http_client``,
            ``window``, ``source``, ``progress``, ``redis_url``, ``batch_id``,
            ``metrics_url``, ``metrics_port``), see
            :class:`SessionOptions`.

    Several worker processes share one window with ``redis_url`` and ``batch_id``: run
    ``ConcurGate(graph, vllm_url=URL, redis_url="redis://...", batch_id="eval-1")`` in each;
    one of them (the elected leader) polls ``/metrics`` and sizes the shared window.
    """

    def __init__(
        self,
        graph: Runnable[Any, Any],
        *,
        vllm_url: str | Sequence[str] | None = None,
        law: ControlLaw | None = None,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
        **options: Unpack[OtherSessionKwargs],
    ) -> None:
        if not callable(getattr(graph, "ainvoke", None)) or not callable(
            getattr(graph, "astream", None)
        ):
            raise ConfigError(f"graph: expected a compiled LangGraph graph, got {graph!r}")
        if checkpointer is not None:
            if not isinstance(checkpointer, BaseCheckpointSaver):
                raise ConfigError(
                    f"checkpointer: expected a LangGraph checkpoint saver (InMemorySaver, "
                    f"AsyncSqliteSaver, ...), got {checkpointer!r}"
                )
            if not isinstance(graph, Pregel):
                raise ConfigError(
                    f"checkpointer: only a compiled LangGraph graph can take one, got {graph!r}"
                )
            graph = graph.copy(update={"checkpointer": checkpointer})
        self.graph = graph
        # Validated now, so a bad option fails at construction, not at the first batch.
        self.options = SessionOptions.from_kwargs({"vllm_url": vllm_url, "law": law, **options})
        self._session: ConcurSession | None = None
        self._handler: ConcurCallbackHandler | None = None
        self._last_session: ConcurSession | None = None
        self._users = 0
        self._lock: asyncio.Lock | None = None
        # Live runs (agent id -> its task and RunControl), for request_drain.
        self._runs: dict[str, tuple[asyncio.Task[Any] | None, RunControl | None]] = {}
        self._drain_reason: str | None = None
        self._drain_cancelled: set[str] = set()
        self._progress: BatchProgress | None = None

    # -- session sharing ---------------------------------------------------------------------

    async def _enter(self) -> tuple[ConcurSession, ConcurCallbackHandler]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._session is None or self._handler is None:
                session = ConcurSession(self.options)
                await session.__aenter__()
                self._session = self._last_session = session
                self._handler = ConcurCallbackHandler(session=session)
            self._users += 1
            return self._session, self._handler

    async def _exit(self) -> None:
        self._users -= 1
        if self._users == 0 and self._session is not None:
            session, self._session, self._handler = self._session, None, None
            # A drain stops the batches of this session; the next session admits again.
            self._drain_reason = None
            self._drain_cancelled.clear()
            await session.__aexit__(None, None, None)

    @asynccontextmanager
    async def _using(self) -> AsyncIterator[tuple[ConcurSession, ConcurCallbackHandler]]:
        pair = await self._enter()
        try:
            yield pair
        finally:
            await self._exit()

    async def __aenter__(self) -> ConcurGate:
        await self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit()

    @property
    def session(self) -> ConcurSession | None:
        """The session of the calls running now (``None`` between batches)."""
        return self._session

    def statistics(self) -> SessionStatistics | None:
        """The statistics of the current session, or of the last one; ``None`` before any."""
        session = self._session or self._last_session
        return session.statistics() if session is not None else None

    def summary(self) -> str | None:
        """The summary of the last batch (``abatch`` / ``abatch_as_completed``): agents and
        outcomes, makespan, how the window moved and why; ``None`` before one ended. It is
        also logged at INFO (logger ``concur_langgraph``) and printed with the progress
        display."""
        progress = self._progress
        return progress.summary if progress is not None else None

    @property
    def progress_shown(self) -> bool:
        """Whether the last batch drew the live display (and printed its summary)."""
        return self._progress is not None and self._progress.enabled

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """A PNG of the last batch over time (window, KV usage, hit rate, agents), written to
        ``path`` (see :meth:`ConcurSession.plot`; needs the ``plot`` extra)."""
        session = self._session or self._last_session
        if session is None:
            raise ConfigError("plot: no batch has run on this ConcurGate yet")
        return session.plot(path, title=title)

    def node(self) -> Callable[[Any, RunnableConfig], Awaitable[None]]:
        """A gate node for hand-built graphs (see :func:`gate_node`)."""
        return gate_node()

    # -- draining ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """Whether :meth:`request_drain` was called for the running batches."""
        return self._drain_reason is not None

    def request_drain(self, reason: str = "stop") -> None:
        """Stop the running batches without losing work; returns at once.

        Each agent that holds a slot finishes the step it is in and stops at the next
        super-step boundary, its checkpoint saved (LangGraph's ``RunControl.request_drain``;
        a call already sent is never wasted). Agents that hold no slot (waiting for their
        first admission, or parked) have sent nothing and stop at once. No agent starts after
        this. Each stopped agent's outcome is :class:`AgentDrainedError`; with a checkpointer
        and a ``batch_id``, running the batch again resumes every one of them. Safe to call
        from a signal handler (``loop.add_signal_handler``) and more than once.
        """
        self._drain_reason = reason
        session = self._session
        for agent_id, (task, control) in list(self._runs.items()):
            holds = session is not None and session.gate.holds(agent_id)
            if control is not None and holds:
                control.request_drain(reason)
            elif task is not None and not task.done() and agent_id not in self._drain_cancelled:
                self._drain_cancelled.add(agent_id)
                task.cancel()

    # -- one agent ---------------------------------------------------------------------------

    async def _run(
        self,
        session: ConcurSession,
        handler: ConcurCallbackHandler,
        input: Any,
        config: RunnableConfig,
        agent_id: str,
        kwargs: dict[str, Any],
    ) -> Any:
        if self._drain_reason is not None:
            raise AgentDrainedError(agent_id, self._drain_reason)
        control: RunControl | None = kwargs.get("control")
        if control is None and isinstance(self.graph, Pregel):
            control = RunControl()
            kwargs = {**kwargs, "control": control}
        task = asyncio.current_task()
        self._runs[agent_id] = (task, control)
        try:
            return await self.graph.ainvoke(input, _with_handler(config, handler), **kwargs)
        except GraphDrained as exc:
            if self._drain_reason is None:
                raise  # the caller's own RunControl drained it: their exception, unchanged
            raise AgentDrainedError(agent_id, exc.reason) from exc
        except asyncio.CancelledError:
            # Our own drain cancelled this agent (and nothing else did): its outcome is a
            # drain, not a cancellation of the caller.
            if (
                agent_id in self._drain_cancelled
                and task is not None
                and task.cancelling() == 1
                and self._drain_reason is not None
            ):
                task.uncancel()
                raise AgentDrainedError(agent_id, self._drain_reason) from None
            raise
        finally:
            self._runs.pop(agent_id, None)
            self._drain_cancelled.discard(agent_id)
            # The handler releases at the root run's end; this covers a run that never
            # started (cancelled before its first step) and costs nothing otherwise.
            await session.gate.release(agent_id)

    async def _plans(
        self,
        inputs: Sequence[Any],
        configs: list[tuple[RunnableConfig, str]],
        batch_id: str | None,
        kwargs: dict[str, Any],
    ) -> list[tuple[AgentPlan, RunnableConfig]]:
        """Each agent's plan and config; without a ``batch_id`` every agent starts afresh."""
        if batch_id is None:
            return [
                (AgentPlan("start", input=input), cfg)
                for input, (cfg, _) in zip(inputs, configs, strict=True)
            ]
        if not isinstance(batch_id, str) or not batch_id:
            raise ConfigError(f"batch_id must be a non-empty string, got {batch_id!r}")
        require_checkpointer(self.graph, batch_id)
        check_durable_kwargs(kwargs)
        out = []
        for index, (input, (cfg, _)) in enumerate(zip(inputs, configs, strict=True)):
            cfg = durable_config(cfg, batch_id=batch_id, task=input)
            plan = await plan_agent(
                self.graph, cfg, task=input, batch_id=batch_id, index=index, kwargs=kwargs
            )
            out.append((plan, cfg))
        return out

    # -- the async API -----------------------------------------------------------------------

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run one agent (``graph.ainvoke`` with the gate); same arguments and result."""
        ((one, agent_id),) = agent_configs(config, 1)
        async with self._using() as (session, handler):
            return await self._run(session, handler, input, one, agent_id, kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Stream one agent (``graph.astream`` with the gate); same arguments and chunks."""
        ((one, agent_id),) = agent_configs(config, 1)
        async with self._using() as (session, handler):
            try:
                async for chunk in self.graph.astream(input, _with_handler(one, handler), **kwargs):
                    yield chunk
            finally:
                await session.gate.release(agent_id)

    async def abatch(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        batch_id: str | None = None,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run one agent per input, all admitted by the gate; outputs in input order.

        With ``batch_id`` (and a checkpointer) the batch is durable: running the same call
        again after a crash or a drain returns finished agents' outputs from their checkpoints
        without running them, and resumes the others from their last checkpoint
        (docs/reliability.md).
        """
        results: list[Any] = [None] * len(inputs)
        async for index, out in self._batch(
            inputs, config, batch_id, return_exceptions=return_exceptions, kwargs=kwargs
        ):
            results[index] = out
        return results

    async def abatch_as_completed(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        batch_id: str | None = None,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[int, Any]]:
        """Like :meth:`abatch`, yielding ``(index, output)`` as each agent finishes.

        In a durable batch, agents that finished in an earlier run come first.
        """
        async for pair in self._batch(
            inputs, config, batch_id, return_exceptions=return_exceptions, kwargs=kwargs
        ):
            yield pair

    async def _batch(
        self,
        inputs: Sequence[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None,
        batch_id: str | None,
        *,
        return_exceptions: bool,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[tuple[int, Any]]:
        inputs = list(inputs)
        if not inputs:
            # Still a session, started and stopped: a bad URL fails here as for any batch, and
            # statistics() describes this (empty) batch rather than nothing.
            async with self._using():
                return
        configs = agent_configs(config, len(inputs), batch_id=batch_id)
        plans = await self._plans(inputs, configs, batch_id, kwargs)
        async with self._using() as (session, handler):
            progress = BatchProgress(session, total=len(inputs), enabled=self.options.progress)

            async def one(index: int, input: Any, config: RunnableConfig, agent_id: str) -> Any:
                try:
                    out = await self._run(session, handler, input, config, agent_id, kwargs)
                except Exception as exc:
                    progress.finished(ok=False)
                    if return_exceptions:
                        return index, exc
                    raise
                progress.finished(ok=True)
                return index, out

            self._progress = progress
            async with progress:
                tasks = [
                    asyncio.create_task(one(index, plan.input, cfg, agent_id))
                    for index, ((plan, cfg), (_, agent_id)) in enumerate(
                        zip(plans, configs, strict=True)
                    )
                    if plan.action != "done"
                ]
                try:
                    for index, (plan, _) in enumerate(plans):
                        if plan.action == "done":  # finished in an earlier run
                            progress.finished(ok=True)
                            yield index, plan.output
                    for next_done in asyncio.as_completed(tasks):
                        yield await next_done
                finally:
                    await _settle(tasks)

    # -- the sync API: refused ---------------------------------------------------------------

    def _sync(self, name: str, instead: str) -> NoReturn:
        raise SyncInvocationError(
            f"ConcurGate.{name} is synchronous, but admission waits asynchronously; use "
            f"`await gate.{instead}(...)` (from sync code: asyncio.run(gate.{instead}(...)))"
        )

    def invoke(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: use :meth:`ainvoke`."""
        self._sync("invoke", "ainvoke")

    def batch(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: use :meth:`abatch`."""
        self._sync("batch", "abatch")

    def batch_as_completed(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: use :meth:`abatch_as_completed`."""
        self._sync("batch_as_completed", "abatch_as_completed")

    def stream(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: use :meth:`astream`."""
        self._sync("stream", "astream")

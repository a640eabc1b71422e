"""``ConcurCallbackHandler``: the gate as a LangChain async callback handler.

Drop it into the callbacks of any LangGraph run and every LLM call of that run, at any depth
(subgraphs, tools that call models), waits at the gate before its request is sent::

    async with ConcurCallbackHandler(vllm_url="http://localhost:8000") as handler:
        results = await graph.abatch(inputs, config={"callbacks": [handler]})

How it works (facts in ``notes/langgraph.md``):

* agent identity comes from the ROOT run (``parent_run_id is None`` in ``on_chain_start``):
  the run's ``thread_id`` when it has one, else the root run id. Every run below is mapped to
  its root as it starts;
* ``on_chat_model_start`` (and ``on_llm_start`` for completion models) is awaited before the
  request goes out (``run_inline = True``), so awaiting the gate there really holds the call;
  ``raise_error = True`` so an admission timeout fails the call instead of being logged;
* the slot is released on the root run's ``on_chain_end`` / ``on_chain_error`` (success,
  interrupt, ``GraphDrained``, errors and ``CancelledError`` all end there), never on
  ``on_llm_end``, which does not fire when a call is cancelled. Release is idempotent.

Synchronous code. LangChain runs async handlers for synchronous callers (``graph.invoke``,
``model.invoke`` inside a sync node) in a fresh event loop on another thread and swallows their
exceptions, where awaiting the gate would hang or be skipped. The handler therefore looks at
who is asking before it hands out its hook:

* a synchronous root run (``graph.invoke`` / ``batch`` / ``stream``) raises
  :class:`SyncInvocationError` at once;
* a synchronous model call on a worker thread inside an async run (a plain ``def`` node that
  calls ``model.invoke``; LangGraph runs it in an executor) is gated for real: the worker
  thread blocks until the gate, running on the batch's event loop, admits the agent;
* a synchronous model call on the event loop's own thread (``model.invoke`` inside an
  ``async def`` node) would block the very loop the gate needs: it raises
  :class:`SyncInvocationError` naming the async method to use.

Lifecycle. A handler with signals (``vllm_url`` or ``source``) must be entered with
``async with`` so its controller has an owner; with ``law=FixedLaw(k)`` and no URL it works
without being entered. Reuse across batches is fine; with a checkpointer every input of a batch
needs its own ``thread_id`` (agents are told apart, and checkpointed, by thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import sys
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Unpack
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackManager
from langchain_core.runnables import RunnableConfig

from concur_langgraph.errors import ConcurError, SyncInvocationError
from concur_langgraph.integrations.usage import usage_of_result
from concur_langgraph.session.options import SessionKwargs
from concur_langgraph.session.session import ConcurSession, SessionUser

__all__ = ["ConcurCallbackHandler", "find_handler"]


class _Root:
    __slots__ = ("agent_id", "pending", "runs", "task")

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        # For a model called outside any graph run: the task that called it (see _bare).
        self.task: asyncio.Task[Any] | None = None
        # Every run id below this root, so that the whole subtree is forgotten at the root's
        # end even when some child's end event never fires (cancellation).
        self.runs: set[UUID] = set()
        # Admissions requested from worker threads, cancelled when the root ends.
        self.pending: set[concurrent.futures.Future[None]] = set()


def _caller_is_coroutine() -> bool:
    # Frame 0 is this function, 1 the property getter, 2 whoever ran getattr(handler, ...):
    # LangChain's async dispatcher is a coroutine, its sync dispatcher (handle_event) is not.
    code = sys._getframe(2).f_code
    return bool(code.co_flags & (inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR))


class ConcurCallbackHandler(SessionUser, AsyncCallbackHandler):
    """Gate every LLM call of the runs it is attached to (see the module docstring).

    Args:
        session: a :class:`ConcurSession` to share with other ways in; the caller owns it.
        **options: otherwise, the options of a session of its own (``vllm_url``, ``law``,
            ``interval_s``, ... see :class:`SessionOptions`), entered by ``async with``.
            ``redis_url`` and ``batch_id`` share the window with the other worker processes
            of the batch (the handler must then be entered).
    """

    run_inline = True
    raise_error = True

    def __init__(
        self, *, session: ConcurSession | None = None, **options: Unpack[SessionKwargs]
    ) -> None:
        super().__init__()
        self._use_session(session, dict(options))
        self._lock = threading.Lock()
        self._root_of: dict[UUID, UUID] = {}
        self._roots: dict[UUID, _Root] = {}
        self._agent_roots: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Model calls outside any graph run are roots of their own, closed by on_llm_end /
        # on_llm_error, neither of which fires when the call is cancelled. So each calling task
        # is watched (one done-callback per task, not per call): when it ends, or starts its
        # next such call, a root it left open is closed and its slot released.
        self._bare: dict[asyncio.Task[Any], UUID] = {}
        self._watched: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def agent_of(self, run_id: UUID | None) -> str | None:
        """The agent id of the root run above ``run_id``, if that run is known."""
        if run_id is None:
            return None
        with self._lock:
            root = self._roots.get(self._root_of.get(run_id, run_id))
            return root.agent_id if root is not None else None

    @property
    def live_runs(self) -> int:
        """Root runs started and not yet ended (0 after a clean batch: nothing leaked)."""
        return len(self._roots)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Releases of cancelled bare model calls still in flight finish inside the session.
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)
        await super().__aexit__(exc_type, exc, tb)

    # -- bookkeeping -------------------------------------------------------------------------

    def _track(self, run_id: UUID, parent_run_id: UUID | None) -> _Root | None:
        if parent_run_id is None:
            return None
        with self._lock:
            root_id = self._root_of.get(parent_run_id)
            root = self._roots.get(root_id) if root_id is not None else None
            if root is not None and root_id is not None:
                self._root_of[run_id] = root_id
                root.runs.add(run_id)
            return root

    def _untrack(self, run_id: UUID) -> None:
        """A run below a root ended: forget it now, so an agent's bookkeeping does not grow
        with its steps (the root's end still sweeps children whose end never fired)."""
        with self._lock:
            root_id = self._root_of.get(run_id)
            if root_id is None or root_id == run_id:
                return
            del self._root_of[run_id]
            root = self._roots.get(root_id)
            if root is not None:
                root.runs.discard(run_id)

    async def _run_ended(self, run_id: UUID) -> None:
        if run_id in self._roots:
            await self._close_root(run_id)
        else:
            self._untrack(run_id)

    def _bare_task_done(self, task: asyncio.Task[Any]) -> None:
        self._watched.discard(task)
        run_id = self._bare.pop(task, None)
        if run_id is not None and run_id in self._roots:
            closer = asyncio.get_running_loop().create_task(self._close_root(run_id))
            self._closers.add(closer)
            closer.add_done_callback(self._closers.discard)

    def _open_root(self, run_id: UUID, metadata: dict[str, Any] | None) -> None:
        thread_id = (metadata or {}).get("thread_id")
        agent_id = str(thread_id) if thread_id is not None else str(run_id)
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop:
                if self._roots:
                    raise ConcurError(
                        "ConcurCallbackHandler is serving runs on two event loops at once; "
                        "use one handler per event loop"
                    )
                self._loop = loop
            root = _Root(agent_id)
            root.runs.add(run_id)
            self._roots[run_id] = root
            self._root_of[run_id] = run_id
            self._agent_roots[agent_id] = self._agent_roots.get(agent_id, 0) + 1

    async def _close_root(self, run_id: UUID) -> None:
        with self._lock:
            root = self._roots.pop(run_id, None)
            if root is None:
                return
            for child in root.runs:
                self._root_of.pop(child, None)
            if root.task is not None and self._bare.get(root.task) == run_id:
                del self._bare[root.task]
            refs = self._agent_roots[root.agent_id] - 1
            if refs:
                self._agent_roots[root.agent_id] = refs
            else:
                del self._agent_roots[root.agent_id]
            pending = list(root.pending)
        for future in pending:
            future.cancel()
        # Two live runs on one thread_id share the agent's slot: the last one out releases it.
        if not refs:
            await self.session.gate.release(root.agent_id)

    def _check_session(self) -> None:
        self.session.check_usable(type(self).__name__)

    # -- chain events ------------------------------------------------------------------------

    @property  # type: ignore[override]
    def on_chain_start(self) -> Callable[..., Any]:
        if _caller_is_coroutine():
            return self._aon_chain_start
        return self._sync_on_chain_start

    async def _aon_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if parent_run_id is None:
            self._check_session()
            self._open_root(run_id, metadata)
        else:
            self._track(run_id, parent_run_id)

    def _sync_on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        if parent_run_id is None:
            name = kwargs.get("name") or "the graph"
            raise SyncInvocationError(
                f"{name} was run synchronously (invoke/batch/stream) with a "
                "ConcurCallbackHandler: the gate waits asynchronously, so use the async "
                "methods (await graph.ainvoke / abatch / astream)"
            )
        self._track(run_id, parent_run_id)

    async def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        await self._run_ended(run_id)

    async def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        await self._run_ended(run_id)

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._track(run_id, parent_run_id)

    async def on_tool_end(
        self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._untrack(run_id)

    async def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._untrack(run_id)

    async def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._track(run_id, parent_run_id)

    async def on_retriever_end(
        self, documents: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._untrack(run_id)

    async def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._untrack(run_id)

    # -- model events: the gate --------------------------------------------------------------

    @property  # type: ignore[override]
    def on_chat_model_start(self) -> Callable[..., Any]:
        if _caller_is_coroutine():
            return self._aon_model_start
        return self._sync_on_model_start

    @property  # type: ignore[override]
    def on_llm_start(self) -> Callable[..., Any]:
        if _caller_is_coroutine():
            return self._aon_model_start
        return self._sync_on_model_start

    def _model_agent(
        self, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None
    ) -> tuple[str, _Root | None]:
        root = self._track(run_id, parent_run_id)
        if root is not None:
            return root.agent_id, root
        # A model called outside any tracked run: it is its own agent, released when the call
        # ends (on_llm_end / on_llm_error).
        thread_id = (metadata or {}).get("thread_id")
        return (str(thread_id) if thread_id is not None else str(run_id)), None

    async def _aon_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        agent_id, root = self._model_agent(run_id, parent_run_id, metadata)
        if root is None:
            self._check_session()
            task = asyncio.current_task()
            if task is not None:
                left_open = self._bare.get(task)
                if left_open is not None:
                    # This task's previous call was cancelled and the task went on (e.g. an
                    # asyncio.timeout caught it): that call is over, release its slot.
                    await self._close_root(left_open)
                elif task not in self._watched:
                    self._watched.add(task)
                    task.add_done_callback(self._bare_task_done)
            self._open_root(run_id, {"thread_id": agent_id})
            if task is not None:
                self._roots[run_id].task = task
                self._bare[task] = run_id
        await self.session.gate.before_llm_call(agent_id)

    def _sync_on_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        agent_id, root = self._model_agent(run_id, parent_run_id, metadata)
        loop = self._loop
        if root is None or loop is None or loop.is_closed() or not loop.is_running():
            raise SyncInvocationError(
                "a chat model was invoked synchronously (model.invoke) outside an async graph "
                "run gated by ConcurCallbackHandler: use `await model.ainvoke(...)` and run the "
                "graph with `await graph.ainvoke(...)` / `abatch(...)`"
            )
        try:
            on_loop_thread = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop_thread = False
        if on_loop_thread:
            raise SyncInvocationError(
                "a chat model was invoked synchronously (model.invoke) inside an async node: "
                "it would block the event loop the gate runs on; use "
                "`await model.ainvoke(...)` in async nodes (plain `def` nodes may call "
                "model.invoke: LangGraph runs them in a worker thread)"
            )
        coro: Coroutine[Any, Any, None] = self.session.gate.before_llm_call(agent_id)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        with self._lock:
            root.pending.add(future)
        try:
            future.result()
        except concurrent.futures.CancelledError as exc:
            raise ConcurError(
                f"agent {agent_id!r}: its run ended while this model call waited for a slot"
            ) from exc
        finally:
            with self._lock:
                root.pending.discard(future)

    async def on_llm_end(
        self, response: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        agent_id = self.agent_of(run_id)
        if agent_id is not None:
            usage = usage_of_result(response)
            prompt, completion = usage if usage is not None else (None, None)
            self.session.gate.after_llm_call(agent_id, prompt, completion)
        await self._run_ended(run_id)

    async def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        agent_id = self.agent_of(run_id)
        if agent_id is not None:
            self.session.gate.after_llm_call(agent_id, None, None)
        await self._run_ended(run_id)


def find_handler(config: RunnableConfig) -> ConcurCallbackHandler | None:
    """The ConcurCallbackHandler among a run's callbacks (``config['callbacks']``), if any."""
    callbacks = config.get("callbacks")
    handlers: list[Any]
    if isinstance(callbacks, BaseCallbackManager):
        handlers = [*callbacks.handlers, *callbacks.inheritable_handlers]
    elif isinstance(callbacks, list):
        handlers = callbacks
    else:
        handlers = []
    for handler in handlers:
        if isinstance(handler, ConcurCallbackHandler):
            return handler
    return None

"""Durable batches: what a batch already did, read back from the LangGraph checkpointer.

A durable batch is a ``ConcurGate.abatch(..., batch_id=...)`` call on a graph with a
checkpointer. Every agent runs on its own thread (``f"{batch_id}/{index}"`` unless the caller
names the threads), and every checkpoint it writes carries the batch id and a fingerprint of the
agent's task in its metadata. The checkpointer is then the batch's record: re-running the same
call after a crash, a Ctrl-C or a SIGKILL asks each thread where it stands (:func:`plan_agent`)
instead of starting over:

* no checkpoint: the agent never started (or died before its first checkpoint); start it;
* a checkpoint with nothing left to run: the agent finished; its output is rebuilt from the
  checkpoint (:func:`stored_output`) and it does not run again;
* a checkpoint waiting on a human-in-the-loop ``interrupt()``: the agent's outcome is that
  interrupt (as ``ainvoke`` returned it); it is answered with ``Command(resume=...)`` on its
  thread, not by re-running the batch;
* a checkpoint with tasks still to run (the process died, the batch was drained, or a node
  raised): resume from that checkpoint with ``ainvoke(None, config)``. LangGraph keeps the writes
  of the finished tasks of an interrupted step, so only unfinished work is redone.

No second store is needed, so any LangGraph saver works (in-memory, SQLite, Postgres), and a
result can never disagree with the state it came from.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.types import StateSnapshot

from concur_langgraph.errors import ConfigError

__all__ = [
    "BATCH_KEY",
    "TASK_KEY",
    "AgentPlan",
    "check_durable_kwargs",
    "durable_config",
    "durable_thread_id",
    "plan_agent",
    "require_checkpointer",
    "task_fingerprint",
]

BATCH_KEY = "concur_batch_id"
"""Checkpoint metadata key: the durable batch a thread belongs to."""
TASK_KEY = "concur_task_sha256"
"""Checkpoint metadata key: the fingerprint of the agent's task (its input)."""

_SERDE = JsonPlusSerializer()


def durable_thread_id(batch_id: str, index: int) -> str:
    """The thread of agent ``index`` of batch ``batch_id`` when the caller names none."""
    return f"{batch_id}/{index}"


def task_fingerprint(task: Any) -> str:
    """A digest of one agent's input, stable across processes.

    LangGraph's own serializer handles everything a checkpoint can hold (messages, pydantic
    models, dataclasses), so any input a graph accepts has a fingerprint.
    """
    kind, data = _SERDE.dumps_typed(task)
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()


def require_checkpointer(graph: Any, batch_id: str) -> None:
    """Raise :class:`ConfigError` (naming ``batch_id``) when the graph has no checkpointer."""
    if not isinstance(getattr(graph, "checkpointer", None), BaseCheckpointSaver):
        raise ConfigError(
            f"batch_id={batch_id!r} asks for a durable batch, which needs a checkpointer: pass "
            "ConcurGate(graph, checkpointer=saver) (e.g. AsyncSqliteSaver) or compile the graph "
            "with one"
        )


def check_durable_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse run options under which a stored output could not be rebuilt as ``ainvoke``'s."""
    mode = kwargs.get("stream_mode", "values")
    if mode != "values":
        raise ConfigError(
            f"stream_mode={mode!r}: a durable batch rebuilds finished agents' outputs from their "
            "checkpoints, which gives ainvoke's default (stream_mode='values') output only"
        )
    version = kwargs.get("version", "v1")
    if version != "v1":
        raise ConfigError(
            f"version={version!r}: a durable batch rebuilds finished agents' outputs in "
            "ainvoke's default (version='v1') shape only"
        )


@dataclass(frozen=True, slots=True)
class AgentPlan:
    """What to do with one agent of a durable batch."""

    action: Literal["start", "resume", "done"]
    """``start`` from the input, ``resume`` from the last checkpoint, or ``done`` already."""
    output: Any = None
    """For ``done``: the output ``ainvoke`` returned (or would have), from the checkpoint."""
    input: Any = None
    """For ``start``: what to run the graph with; ``resume`` runs with ``None``."""


def _output_keys(graph: Any, kwargs: dict[str, Any]) -> str | list[str]:
    keys = kwargs.get("output_keys")
    if keys is None:
        keys = graph.output_channels
    return keys if isinstance(keys, str) else list(keys)


def stored_output(
    graph: Any, values: dict[str, Any], interrupts: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The output ``ainvoke`` gives for a thread in this state (``stream_mode='values'``)."""
    keys = _output_keys(graph, kwargs)
    if isinstance(keys, str):
        # A single output channel: ainvoke returns its value (no room for interrupts there).
        return values.get(keys)
    out = {key: values[key] for key in keys if key in values}
    if interrupts:
        out["__interrupt__"] = list(interrupts)
    return out


async def plan_agent(
    graph: Any,
    config: RunnableConfig,
    *,
    task: Any,
    batch_id: str,
    index: int,
    kwargs: dict[str, Any],
) -> AgentPlan:
    """Where agent ``index`` stands, read from its thread's latest checkpoint.

    Raises :class:`ConfigError` when the thread holds another task's history: the batch's task
    list changed under the same ``batch_id``, or the thread was used outside this batch.
    """
    fingerprint = task_fingerprint(task)
    snapshot = await graph.aget_state(config)
    if snapshot.metadata is None:  # no checkpoint on this thread
        # A copy: LangGraph writes into the input it is given (add_messages assigns message
        # ids), and the caller's task must keep the fingerprint it has now for the next run.
        return AgentPlan("start", input=copy.deepcopy(task))
    thread_id = (config.get("configurable") or {}).get("thread_id")
    metadata = snapshot.metadata or {}
    recorded_batch, recorded_task = metadata.get(BATCH_KEY), metadata.get(TASK_KEY)
    if recorded_batch != batch_id or recorded_task != fingerprint:
        what = (
            "was not written by this batch"
            if recorded_batch != batch_id
            else "holds a different task: the task list changed since the batch first ran"
        )
        raise ConfigError(
            f"inputs[{index}]: thread {thread_id!r} of batch_id={batch_id!r} {what}; run the "
            "original tasks to resume the batch, or use a new batch_id"
        )
    return _plan_from(graph, snapshot, kwargs)


def _plan_from(graph: Any, snapshot: StateSnapshot, kwargs: dict[str, Any]) -> AgentPlan:
    """``done`` exactly when LangGraph has nothing left to run on this thread.

    ``snapshot.tasks`` is what LangGraph's loop would plan from the latest checkpoint (every
    task of the open super-step, finished ones included). ``snapshot.next`` is NOT the test:
    it leaves out tasks whose writes are already saved, so after a crash between a step's
    writes and the checkpoint that closes the step it is empty although the graph has more
    to run (the step's writes are applied, and the steps they trigger run, on resume).
    """
    tasks = snapshot.tasks
    if not tasks:
        return AgentPlan("done", stored_output(graph, snapshot.values, (), kwargs))
    # Stopped at a human-in-the-loop interrupt: every unfinished task of the step (those in
    # ``next``; in the latest snapshot only unfinished tasks report pending interrupts) waits
    # for an answer, so ``ainvoke`` returned (or would return) the interrupt. Any other
    # unfinished task means the run was cut short: resume it.
    waiting = sum(1 for task in tasks if task.interrupts)
    if waiting and waiting == len(snapshot.next):
        return AgentPlan("done", stored_output(graph, snapshot.values, snapshot.interrupts, kwargs))
    return AgentPlan("resume")


def durable_config(config: RunnableConfig, *, batch_id: str, task: Any) -> RunnableConfig:
    """``config`` with the batch id and task fingerprint in the metadata of its checkpoints."""
    out = RunnableConfig(**config)
    out["metadata"] = {
        **(config.get("metadata") or {}),
        BATCH_KEY: batch_id,
        TASK_KEY: task_fingerprint(task),
    }
    return out

"""A checkpoint store that stops a batch at a chosen write, for crash-at-every-write tests.

:class:`StoppingSaver` sits between a graph and the saver that keeps the batch's checkpoints
(``disk``). It counts the writes the graph makes (``aput``: a checkpoint, ``aput_writes``: the
writes of one task) as they complete, and runs ``hooks[k]`` right after the k-th completed
write (``hooks[0]`` before the first one): a cancel, a drain, a signal, a SIGKILL of the
process. With ``die_after=N`` the process "dies" in place after write N: every later write
raises :class:`ProcessDied` and never reaches ``disk``, so ``disk`` holds exactly what a
SIGKILL right after write N leaves (in one process; the real kill is a hook that sends one).

Reads always go to ``disk``. Nothing here knows about the gate: the same wrapper works over any
saver (in-memory, SQLite).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)

T = TypeVar("T")


class ProcessDied(BaseException):
    """A write after the simulated death: it never reached the store."""


class StoppingSaver(BaseCheckpointSaver[Any]):
    """``disk``, with ``hooks`` run at chosen writes (see the module docstring)."""

    def __init__(
        self,
        disk: BaseCheckpointSaver[Any],
        *,
        hooks: Mapping[int, Callable[[], None]] | None = None,
        die_after: int | None = None,
    ) -> None:
        super().__init__(serde=disk.serde)
        self.disk = disk
        self.hooks = dict(hooks or {})
        self.die_after = die_after
        self.writes = 0
        """Writes that reached ``disk``."""
        self.stopped = False
        """Whether a hook ran or the process died."""

    def _at(self, count: int) -> None:
        hook = self.hooks.pop(count, None)
        if hook is not None:
            self.stopped = True
            hook()

    async def _write(self, write: Callable[[], Awaitable[T]]) -> T:
        self._at(0)
        if self.die_after is not None and self.writes >= self.die_after:
            self.stopped = True
            raise ProcessDied(f"the process died after write {self.die_after}")
        result = await write()
        self.writes += 1
        self._at(self.writes)
        return result

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self.disk.aget_tuple(config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        async for item in self.disk.alist(config, filter=filter, before=before, limit=limit):
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._write(lambda: self.disk.aput(config, checkpoint, metadata, new_versions))

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self._write(lambda: self.disk.aput_writes(config, writes, task_id, task_path))

    async def adelete_thread(self, thread_id: str) -> None:
        await self.disk.adelete_thread(thread_id)

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self.disk.get_next_version(current, channel)


_PRELOAD = [
    "concur_langgraph",
    "langgraph.graph",
    "langgraph.checkpoint.sqlite.aio",
    "langchain_core.messages",
]
"""Imported once by the fork server, so each child starts in milliseconds."""


def run_in_child(target: Callable[..., object], *args: object, timeout_s: float = 120) -> int:
    """Run ``target(*args)`` in a child process; its exit code (``-9``: SIGKILLed).

    The child is forked from multiprocessing's fork server, a single-threaded process started
    once per test session with the heavy imports done: forking pytest itself would copy
    whatever threads its earlier tests left behind. ``target`` and ``args`` must be picklable
    (a module-level function; paths, names and numbers).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    process = context.Process(target=target, args=args, daemon=True)
    process.start()
    process.join(timeout_s)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"the child {target.__name__}{args!r} ran past {timeout_s} s")
    return process.exitcode

"""A live one-line view of a gated batch: agents done/active/parked/waiting, window, KV usage.

Refreshed from :meth:`ConcurSession.statistics` by a task owned by the ``async with`` block (no
thread: rich's own auto-refresh thread is turned off). ``enabled=None`` shows it only when the
console is a terminal, so logs, CI output and pipes stay clean.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ._adaptive import OPEN
from ._session import ConcurSession

__all__ = ["BatchProgress"]


class BatchProgress:
    """Live display of one batch.

    Args:
        session: the batch's session (read through ``statistics()`` only).
        total: number of agents in the batch.
        enabled: ``True`` always, ``False`` never, ``None`` when the console is a terminal.
        console: where to draw (default: stdout).
        refresh_s: seconds between redraws (event-loop time: virtual under virtual time).
    """

    def __init__(
        self,
        session: ConcurSession,
        *,
        total: int,
        enabled: bool | None = None,
        console: Console | None = None,
        refresh_s: float = 0.5,
    ) -> None:
        self._session = session
        self.total = total
        self.done = 0
        self.failed = 0
        self._console = console if console is not None else Console()
        self.enabled = self._console.is_terminal if enabled is None else enabled
        self._refresh_s = refresh_s
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None

    def finished(self, *, ok: bool) -> None:
        """Count one agent whose run ended."""
        self.done += 1
        if not ok:
            self.failed += 1

    def render(self) -> Text:
        """The current line."""
        stats = self._session.statistics()
        gate = stats.gate
        parts = [
            f"agents {self.done}/{self.total} done",
            f"{gate.active} active",
            f"{gate.parked} parked",
            f"{gate.waiting} waiting",
            f"window {'open' if gate.window.limit >= OPEN else gate.window.limit}",
        ]
        if self.failed:
            parts.insert(1, f"{self.failed} failed")
        controller = stats.controller
        sample = controller.last_sample if controller is not None else None
        if sample is not None:
            parts.append(f"KV {sample.kv_usage:.0%}")
            if sample.prefix_hit_rate is not None:
                parts.append(f"hit {sample.prefix_hit_rate:.0%}")
            if controller is not None and controller.stale:
                parts.append(f"metrics stale {controller.staleness_s:.0f}s")
        return Text(" | ".join(parts))

    async def __aenter__(self) -> BatchProgress:
        if self.enabled:
            self._live = Live(self.render(), console=self._console, auto_refresh=False)
            self._live.start()
            self._task = asyncio.create_task(self._refresh())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() does not re-raise the task's CancelledError, so a cancellation of the
            # batch itself still propagates from here.
            await asyncio.wait([task])
        live, self._live = self._live, None
        if live is not None:
            live.update(self.render(), refresh=True)
            live.stop()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            if self._live is not None:
                self._live.update(self.render(), refresh=True)

"""A live one-line view of a gated batch, and its summary when it ends.

The line (agents done/active/parked/waiting, window, KV usage) is refreshed from
:meth:`ConcurSession.statistics` by a task owned by the ``async with`` block (no thread: rich's
own auto-refresh thread is turned off). ``enabled=None`` shows it only when the console is a
terminal, so logs, CI output and pipes stay clean.

At the end of the block the batch's summary (agents and outcomes, makespan, how the window
moved and the last decision's reason) is logged at INFO on the ``concur_langgraph`` logger,
printed under the line when the display is on, and kept in :attr:`BatchProgress.summary`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from concur_langgraph.core.window import window_text
from concur_langgraph.errors import ConfigError
from concur_langgraph.session.session import ConcurSession
from concur_langgraph.session.statistics import ReplicaSnapshot

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

__all__ = ["BatchProgress"]

logger = logging.getLogger("concur_langgraph")


class BatchProgress:
    """Live display of one batch.

    Args:
        session: the batch's session (read through ``statistics()`` only).
        total: number of agents in the batch.
        enabled: ``True`` always, ``False`` never, ``None`` when the console is a terminal
            and rich (the ``cli`` extra) is installed. ``True`` without rich is a
            :class:`ConfigError` saying how to install it.
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
        if console is None and enabled is not False:
            console = _console(required=enabled is True)
        self._console = console
        self.enabled = console is not None and console.is_terminal if enabled is None else enabled
        self._refresh_s = refresh_s
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None
        self._started: float | None = None
        self.summary: str | None = None
        """The batch's summary, once the ``async with`` block has ended."""

    def finished(self, *, ok: bool) -> None:
        """Count one agent whose run ended."""
        self.done += 1
        if not ok:
            self.failed += 1

    def render(self) -> Any:
        """The current line (a ``rich.text.Text``)."""
        from rich.text import Text

        stats = self._session.statistics()
        gate = stats.gate
        parts = [
            f"agents {self.done}/{self.total} done",
            f"{gate.active} active",
            f"{gate.parked} parked",
            f"{gate.waiting} waiting",
            f"window {window_text(gate.window.limit)}",
        ]
        if self.failed:
            parts.insert(1, f"{self.failed} failed")
        if stats.replicas:
            # Each replica's window and pressure: "r0 8 KV 91%, r1 12 KV 64%, r2 dead".
            parts.append(", ".join(_replica_part(replica) for replica in stats.replicas))
        controller = stats.controller
        sample = controller.last_sample if controller is not None else None
        if sample is not None:
            parts.append(f"KV {sample.kv_usage:.0%}")
            if sample.prefix_hit_rate is not None:
                parts.append(f"hit {sample.prefix_hit_rate:.0%}")
            if controller is not None and controller.stale:
                parts.append(f"metrics stale {controller.staleness_s:.0f}s")
        return Text(" | ".join(parts))

    def render_summary(self, seconds: float) -> str:
        """The batch in a few lines: outcomes, makespan, the window's course and last reason."""
        stats = self._session.statistics()
        gate = stats.gate
        unfinished = self.total - self.done
        outcome = f"{self.done - self.failed} ok, {self.failed} failed"
        if unfinished:
            outcome += f", {unfinished} unfinished (stopped)"
        lines = [
            f"concur batch: {self.total} agents ({outcome}) in {seconds:,.1f} s; "
            f"{gate.llm_calls:,} LLM calls, {gate.parks_total:,} parks"
        ]
        windows = [int(w) for w in self._session.timeline().get("window", []) if w is not None]
        if stats.replicas:
            lines.append(f"windows: {', '.join(_replica_part(r) for r in stats.replicas)}")
            lines.extend(
                f"replica {r.index}: {r.placed_total} agents placed, {r.gate.parks_total} parks"
                + ("" if r.alive else ", died during the batch")
                for r in stats.replicas
            )
        elif windows:
            low, high = min(windows), max(windows)
            lines.append(
                f"window: stayed {window_text(low)}"
                if low == high
                else f"window: started {window_text(windows[0])}, ranged {window_text(low)} "
                f"to {window_text(high)}, ended {window_text(gate.window.limit)}"
            )
        else:
            lines.append(f"window: {window_text(gate.window.limit)} (no controller)")
        controller = stats.controller
        decision = controller.last_decision if controller is not None else None
        if decision is not None:
            lines.append(f"last decision: {decision}")
        return "\n".join(lines)

    async def __aenter__(self) -> BatchProgress:
        self._started = asyncio.get_running_loop().time()
        if self.enabled:
            from rich.live import Live

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
        started = self._started if self._started is not None else math.nan
        self.summary = self.render_summary(asyncio.get_running_loop().time() - started)
        logger.info(self.summary, extra={"event": "batch_summary"})
        if self.enabled and self._console is not None:
            self._console.print(self.summary, highlight=False)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            if self._live is not None:
                self._live.update(self.render(), refresh=True)


def _console(*, required: bool) -> Console | None:
    """A rich console on stdout; ``None`` without rich unless ``required`` (then an error)."""
    try:
        from rich.console import Console
    except ImportError as exc:
        if required:
            raise ConfigError(
                "progress: the live display needs rich: pip install 'concur-langgraph[cli]'"
            ) from exc
        return None
    return Console(file=sys.stdout)


def _replica_part(replica: ReplicaSnapshot) -> str:
    if not replica.alive:
        return f"r{replica.index} dead"
    part = f"r{replica.index} {window_text(replica.gate.window.limit)}"
    controller = replica.controller
    sample = controller.last_sample if controller is not None else None
    if sample is not None:
        part += f" KV {sample.kv_usage:.0%}"
    return part

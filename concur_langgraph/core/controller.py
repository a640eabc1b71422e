"""The controller: every ``interval_s``, one sample -> the law -> the window.

It owns the polling task (started and cancelled by ``async with``), the clock, and the decision
of what to do when the signals are missing: hold the window. Missing data never shrinks the
window, and the window never goes below ``min_window >= 1``, so admitted agents always make
progress and waiting agents are always eventually admitted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from concur_langgraph.checks import check_count, check_number
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.core.law import WindowLaw, as_control_law
from concur_langgraph.core.signals import Sample, SignalSource
from concur_langgraph.core.window import WindowStatistics, window_text
from concur_langgraph.errors import ConfigError, MetricsError

__all__ = [
    "TIMELINE_KEYS",
    "Controller",
    "ControllerStatistics",
    "WindowChange",
    "WindowDecision",
    "stop_task",
]

logger = logging.getLogger("concur_langgraph")


class _ResizableWindow(Protocol):
    """The part of :class:`AdmissionWindow` the controller uses."""

    @property
    def limit(self) -> int: ...

    async def set_limit(self, limit: int) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowChange:
    """One move of the window, as passed to ``on_change``."""

    time: float
    """When it happened, on the controller's clock (seconds)."""
    old: int
    """The window before."""
    new: int
    """The window after."""
    sample: Sample | None
    """The sample that caused it; ``None`` for the initial window."""
    reason: str = ""
    """Why, in words (:attr:`WindowDecision.reason`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowDecision:
    """What one tick decided, and why: the window kept is a decision too."""

    time: float
    """When, on the controller's clock (seconds)."""
    old: int
    """The window before the tick."""
    proposed: int | None
    """What the law returned (``None``: the law was not asked, the metrics were missing)."""
    new: int
    """The window after the tick (the law's proposal, capped and clamped)."""
    reason: str
    """Why, in words: the law's own account (its phase and the signals that decided it, from
    its ``explain(window, sample)``), then what the controller changed (demand cap, clamp)."""
    sample: Sample | None
    """The sample the decision was made on (``None`` when the metrics were missing)."""

    def __str__(self) -> str:
        move = (
            f"{window_text(self.old)} -> {window_text(self.new)}"
            if self.new != self.old
            else f"kept at {window_text(self.new)}"
        )
        return f"window {move}: {self.reason}"


TIMELINE_KEYS = (
    "t",
    "window",
    "kv_usage",
    "hit_rate",
    "admitted",
    "queued",
    "running",
    "waiting",
    "preemptions",
)
"""Columns of :meth:`Controller.timeline`: seconds since the start, the window after the tick,
the server's signals, the agents holding a slot and queued at the gate."""

_TIMELINE_ROWS = 20_000  # even (see _record)
"""Rows kept before the timeline halves its resolution (every other row dropped, the stride
doubled): an hours-long batch costs at most a few MB, and a plot needs no more points."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerStatistics:
    """A snapshot of the controller's state."""

    window: int
    """The window now (the admission window's limit)."""
    last_sample: Sample | None
    """The latest sample received (possibly a stale one); ``None`` before the first tick."""
    stale: bool
    """True while the latest tick brought no usable data (error or stale sample)."""
    staleness_s: float
    """Seconds since the last good sample (since the start if there was none yet)."""
    ticks: int
    """Ticks run (good, stale and failed)."""
    errors: int
    """Ticks whose sample failed with a metrics error."""
    changes: int
    """Window changes made by the law (the initial window not counted)."""
    overruns: int
    """Ticks skipped because a tick took longer than ``interval_s`` (slow scrapes)."""
    last_decision: WindowDecision | None = None
    """The latest tick's decision and its reason (``None`` before the first tick)."""


class Controller:
    """Drives an admission window from a signal source through a control law.

    Args:
        source: where samples come from; ``start()`` is awaited on entry (a wrong URL fails
            there) and ``aclose()`` on exit.
        law: maps (window, sample) to the next window.
        window: the admission window whose ``limit`` is set.
        interval_s: seconds between ticks (1 s: the vLLM gauges and counters move within a
            second under load, and the paper's re-implementations tick every 1-5 s).
        min_window: the window never goes below this (>= 1, so agents cannot deadlock).
        max_window: the window never goes above this; ``None`` for no bound.
        initial_window: the window set on entry, before any sample (4, as chosen by both known
            re-implementations of CONCUR; the paper does not state one).
        clock: returns the current time in seconds; defaults to the running loop's ``time()``
            (so a virtual-time loop drives the controller with no special code). Sleeping is
            always ``asyncio.sleep``: give a clock that agrees with the loop.
        on_change: called with a :class:`WindowChange` each time the controller moves the
            window (the initial window included). An exception it raises stops the controller
            and is raised on exit.
        accounting: returns the gate's per-agent accounting (:meth:`Gate.accounting`), which
            each sample then carries to the law (``Sample.agents``); ``None``: samples carry
            none.
    """

    def __init__(
        self,
        *,
        source: SignalSource,
        law: WindowLaw,
        window: _ResizableWindow,
        interval_s: float = 1.0,
        min_window: int = 1,
        max_window: int | None = None,
        initial_window: int = 4,
        clock: Callable[[], float] | None = None,
        on_change: Callable[[WindowChange], object] | None = None,
        accounting: Callable[[], Sequence[AgentAccount]] | None = None,
    ) -> None:
        interval_s = check_number("interval_s", interval_s, low=0, low_open=True)
        check_count("min_window", min_window, minimum=1)
        check_count(
            "max_window", max_window, minimum=min_window, minimum_name="min_window", optional=True
        )
        check_count("initial_window", initial_window, minimum=1)
        if initial_window < min_window or (max_window is not None and initial_window > max_window):
            raise ConfigError(
                f"initial_window: must lie in [min_window, max_window] = "
                f"[{min_window}, {max_window if max_window is not None else 'unbounded'}], "
                f"got {initial_window}"
            )
        self._source = source
        self._law = as_control_law(law)
        self._window = window
        self._interval_s = float(interval_s)
        self._min = min_window
        self._max = max_window
        self._initial = initial_window
        self._clock = clock
        self._on_change = on_change
        self._accounting = accounting

        self._task: asyncio.Task[None] | None = None
        self._entered = False
        self._started_at = 0.0
        self._last_sample: Sample | None = None
        self._last_good_time: float | None = None
        self._stale = False
        self._outage_since: float | None = None
        self._outage_ticks = 0
        self._ticks = 0
        self._errors = 0
        self._changes = 0
        self._overruns = 0
        self._decision: WindowDecision | None = None
        self._timeline: list[tuple[float | int | None, ...]] = []
        self._stride = 1
        self._skipped = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Controller:
        if self._entered:
            raise RuntimeError("a Controller can be entered only once")
        self._entered = True
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        try:
            await self._source.start()
            self._started_at = self._clock()
            await self._set_window(self._initial, sample=None, now=self._started_at)
            self._timeline.append((0.0, self._window.limit, *[None] * (len(TIMELINE_KEYS) - 2)))
        except BaseException:
            await self._source.aclose()
            raise
        self._task = asyncio.create_task(self._run(), name="concur-controller")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        try:
            if task is not None:
                failure = await stop_task(task)
                # The body's own exception wins; the controller's was logged when it happened.
                if failure is not None and exc is None:
                    raise failure
        finally:
            await self._source.aclose()

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            clock = self._now
            deadline = clock() + self._interval_s
            while True:
                await asyncio.sleep(max(0.0, deadline - clock()))
                await self.tick()
                deadline += self._interval_s
                behind = clock() - deadline
                if behind > 0:
                    # A tick outlasted the interval: skip the ticks now in the past (never run
                    # them back to back) and stay on the original cadence.
                    missed = math.ceil(behind / self._interval_s)
                    self._overruns += missed
                    deadline += missed * self._interval_s
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "concur controller stopped; the window stays at %d",
                self._window.limit,
                extra={"event": "controller_failed", "window": self._window.limit},
            )
            raise

    async def tick(self) -> Sample | None:
        """One control step: sample, apply the law, clamp, set the window.

        Returns the sample (``None`` if the source failed). On a metrics error or a stale
        sample the window is held. Public so tests can drive the controller step by step.
        """
        now = self._now()
        self._ticks += 1
        try:
            sample = await self._source.sample(now)
        except MetricsError as exc:
            self._errors += 1
            self._hold(now, reason=str(exc))
            return None
        self._last_sample = sample
        if sample.stale:
            self._hold(
                now,
                reason=f"partial or stale metrics (staleness {sample.staleness_s:.1f} s)",
                sample=sample,
            )
            return sample
        self._recovered(now)
        self._last_good_time = now
        current = self._window.limit
        stats = self._window_statistics()
        if stats is not None:
            # What the window knows and the server cannot: how many agents hold slots and how
            # many wait (laws such as AdmitLaw size the window from them).
            sample = dataclasses.replace(
                sample,
                agents_admitted=stats.holders,
                agents_queued=stats.waiting_new + stats.waiting_parked,
            )
            self._last_sample = sample
        if self._accounting is not None:
            sample = dataclasses.replace(sample, agents=tuple(self._accounting()))
            self._last_sample = sample
        law_proposed = self._law.next_window(current, sample)
        reasons = [self._law.explain(current, sample)]
        proposed = law_proposed
        if proposed > current and stats is not None and self._law.follows_demand:
            # Window validation, as TCP does for an application-limited sender (RFC 7661):
            # grow only up to the agents that want a slot. Slots nobody can use are no evidence
            # that more would be fine, and a window inflated past the batch in a quiet phase
            # takes several halvings to come back when thrashing starts (a 48-agent batch
            # reached a window of 386 without this).
            demand = stats.holders + stats.waiting_new + stats.waiting_parked
            capped = max(current, min(proposed, demand))
            if capped != proposed:
                reasons.append(
                    f"growth capped at the {demand} agents that hold or want a slot"
                    if capped == demand
                    else f"kept at {window_text(current)}: no more agents want a slot"
                )
            proposed = capped
        new = self._clamp(proposed)
        if new != proposed:
            bound = "min_window" if new > proposed else "max_window"
            reasons.append(f"clamped to {bound} {new}")
        self._decide(
            WindowDecision(
                time=now,
                old=current,
                proposed=law_proposed,
                new=new,
                reason="; ".join(reasons),
                sample=sample,
            )
        )
        await self._set_window(new, sample=sample, now=now)
        return sample

    def _window_statistics(self) -> WindowStatistics | None:
        # Optional: the controller only needs limit/set_limit; a window that also reports its
        # holders and waiters lets the laws see them and caps growth at the demand.
        statistics = getattr(self._window, "statistics", None)
        return None if statistics is None else statistics()  # type: ignore[no-any-return]

    def _decide(self, decision: WindowDecision) -> None:
        self._decision = decision
        if decision.new == decision.old:
            logger.debug("concur %s", decision, extra={"event": "window_kept"})
        self._record(decision)

    def _record(self, decision: WindowDecision) -> None:
        self._skipped += 1
        if self._skipped < self._stride:
            return
        self._skipped = 0
        sample = decision.sample
        self._timeline.append(
            (
                round(decision.time - self._started_at, 6),
                decision.new,
                None if sample is None else sample.kv_usage,
                None if sample is None else sample.prefix_hit_rate,
                None if sample is None else sample.agents_admitted,
                None if sample is None else sample.agents_queued,
                None if sample is None else sample.running,
                None if sample is None else sample.waiting,
                None if sample is None else sample.preemptions,
            )
        )
        if len(self._timeline) >= _TIMELINE_ROWS:
            # An even count: the rows dropped include the newest, so the next row is due
            # ``stride`` (the old one) ticks from now, keeping the spacing even.
            del self._timeline[1::2]
            self._skipped = self._stride
            self._stride *= 2

    def timeline(self) -> dict[str, list[float | int | None]]:
        """One row per tick so far (columns :data:`TIMELINE_KEYS`; ``None`` where a tick had
        no data). Long batches keep every ``2**k``-th tick, so the rows stay under 20,000."""
        columns = zip(*self._timeline, strict=True) if self._timeline else ()
        out = {key: list(column) for key, column in zip(TIMELINE_KEYS, columns, strict=True)}
        return out or {key: [] for key in TIMELINE_KEYS}

    def statistics(self) -> ControllerStatistics:
        """A snapshot of the controller's state."""
        now = self._now() if self._clock is not None else self._started_at
        since = self._last_good_time if self._last_good_time is not None else self._started_at
        return ControllerStatistics(
            window=self._window.limit,
            last_sample=self._last_sample,
            stale=self._stale,
            staleness_s=max(0.0, now - since),
            ticks=self._ticks,
            errors=self._errors,
            changes=self._changes,
            overruns=self._overruns,
            last_decision=self._decision,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        return self._clock()

    def _clamp(self, window: int) -> int:
        window = max(self._min, window)
        return window if self._max is None else min(self._max, window)

    async def _set_window(self, new: int, *, sample: Sample | None, now: float) -> None:
        old = self._window.limit
        if new == old:
            return
        await self._window.set_limit(new)
        if sample is not None:
            self._changes += 1
        decision = self._decision if sample is not None else None
        reason = decision.reason if decision is not None else "the initial window"
        logger.info(
            "concur window %s -> %s: %s",
            window_text(old),
            window_text(new),
            reason,
            extra={
                "event": "window_change",
                "window_old": old,
                "window_new": new,
                "reason": reason,
                "kv_usage": None if sample is None else sample.kv_usage,
                "prefix_hit_rate": None if sample is None else sample.prefix_hit_rate,
                "preemptions": None if sample is None else sample.preemptions,
            },
        )
        if self._on_change is not None:
            self._on_change(WindowChange(time=now, old=old, new=new, sample=sample, reason=reason))

    def _hold(self, now: float, *, reason: str, sample: Sample | None = None) -> None:
        window = self._window.limit
        self._decide(
            WindowDecision(
                time=now,
                old=window,
                proposed=None,
                new=window,
                reason=f"metrics missing, window held: {reason}",
                sample=sample,
            )
        )
        self._stale = True
        self._outage_ticks += 1
        if self._outage_since is not None:
            return
        self._outage_since = now
        logger.warning(
            "concur: vLLM metrics unavailable, holding the window at %d: %s",
            self._window.limit,
            reason,
            extra={"event": "metrics_outage", "window": self._window.limit, "reason": reason},
        )

    def _recovered(self, now: float) -> None:
        self._stale = False
        if self._outage_since is None:
            return
        duration, ticks = now - self._outage_since, self._outage_ticks
        self._outage_since, self._outage_ticks = None, 0
        logger.info(
            "concur: vLLM metrics back after %.1f s (%d ticks without data)",
            duration,
            ticks,
            extra={"event": "metrics_recovered", "outage_s": duration, "outage_ticks": ticks},
        )


async def stop_task(task: asyncio.Task[None]) -> BaseException | None:
    """Cancel ``task`` and wait for it; return the exception it died of, if any."""
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves: do not swallow it
            return None
        except Exception as exc:
            return exc
        return None
    if task.cancelled():
        return None
    return task.exception()

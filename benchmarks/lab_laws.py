"""Candidate control laws that lost to ``AdmitLaw``, kept for the law lab (``law_lab.py``).

They shipped in the package until the layout of issue 13 took them out: the wheel holds the
laws we recommend and nothing else. docs/laws.md keeps their results. Each is a pure object
like the package's laws (no I/O, no clock):

* :class:`WorkingSetLaw`: *how many* agents fit the KV cache (capacity over footprint);
* :class:`LossAimdLaw`: AIMD on preemptions and requests waiting for KV capacity;
* :class:`GoodputLaw`, :class:`DescentLaw`, :class:`ClimbLaw`: *whether* restricting pays,
  measured as generated tokens per second across window changes;
* :class:`ProbeLaw`: no control while over-subscription is cheap to undo, a verified token
  budget when it is not, widened by probes (which proved myopic).

Variants of the default law (``FitLaw``) that did not beat it:

* :class:`NewcomerFitLaw`: ``FitLaw`` with newcomers and young agents sized at the active
  agents' mean context instead of their own;
* :class:`KeepLargestFitLaw`: ``FitLaw`` counting the admitted agents largest first, the order
  in which a smallest-first victim rule keeps them (for :class:`PolicyWindow`);
* :class:`SharedPrefixFitLaw`: ``FitLaw`` with the prefix every agent shares counted once.

And one window: :class:`PolicyWindow`, the in-process window with another victim choice
(smallest context first, as ThunderAgent pauses) and another resume order (best-fit-decreasing
by context), for issue 15's victim and resume policies (measured in docs/laws.md).

``TokenBudgetLaw`` stays in the package (``AdmitLaw`` sizes its budget with it).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from concur_langgraph import AgentAccount, ConfigError, FitLaw, Sample
from concur_langgraph.checks import check_number
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.window import OPEN, LocalWindow, Permit
from concur_langgraph.laws.admit import TokenBudgetLaw, gate_counts, requests_finished

__all__ = [
    "ClimbLaw",
    "DescentLaw",
    "GoodputLaw",
    "KeepLargestFitLaw",
    "LossAimdLaw",
    "NewcomerFitLaw",
    "PolicyWindow",
    "ProbeLaw",
    "SharedPrefixFitLaw",
    "WorkingSetLaw",
]


def _check(
    name: str, value: object, lo: float, hi: float = math.inf, *, lo_open: bool = False
) -> None:
    check_number(name, value, low=lo, high=hi, low_open=lo_open)


def _footprint(sample: Sample) -> float | None:
    """Tokens one agent's context takes in the KV cache, or None when it cannot be told.

    Preferred: ``(prompt_tokens + generation_tokens) / requests_finished`` over the interval,
    the length of an agent's history at the end of a step (vLLM counts a request's whole
    prompt, cached or not). It does not depend on what the cache holds right now. Fallback:
    ``kv_usage * capacity / running``, each running request's share of the cache; it is
    biased low while requests wait in a prefill queue (counted running, holding few blocks),
    which is exactly when thrashing starts.
    """
    finished = requests_finished(sample)
    if finished is not None and finished > 0:
        return (sample.prompt_tokens + sample.generation_tokens) / finished
    if finished is not None:
        return None
    cap = sample.kv_capacity_tokens
    if cap is None or cap <= 0 or sample.running <= 0 or sample.kv_usage <= 0:
        return None
    return sample.kv_usage * cap / sample.running


# ---- working set -----------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class WorkingSetLaw(LawDefaults):
    """Token-budget admission: as many agents as the KV cache can hold the contexts of.

    With ``F`` the smoothed footprint of one agent (per tick: ``(prompt_tokens +
    generation_tokens) / requests_finished`` when the sample carries ``requests_finished``,
    else ``kv_usage * kv_capacity_tokens / running``; an exponential moving average with
    weight ``smoothing`` on the newest value)::

        W' = max(1, floor(fill * kv_capacity_tokens / F))

    An admitted agent in a tool call keeps its context in the cache (vLLM's free LRU) only if
    the contexts of all admitted agents fit: ``W * F <= capacity``. ``fill = 1.0`` sizes the
    window to exactly that; the paper-256 sweep puts the best static window where
    ``W * mean context ~ capacity``. The window tracks context growth (it shrinks as
    histories grow and widens in the warm-up), which a static window cannot.

    It holds the window while the footprint is unknown (no running request, or a server that
    does not export ``cache_config_info``). It ignores whether recompute is actually costly:
    on a server where it is cheap this law is slower than no control, and per-tick footprints
    jitter (few requests finish in a second; see :class:`TokenBudgetLaw` and docs/laws.md).
    """

    fill: float = 1.0
    """Fraction of the KV cache the admitted agents' contexts may fill (> 0)."""
    smoothing: float = 0.3
    """EWMA weight of the newest footprint measurement (0 < smoothing <= 1)."""
    starts_open: bool = True
    """Start with every agent admitted: the first samples size the window from there."""
    ramp: float | None = None
    """Most the window may grow in one tick, as a factor (``None``: no limit). Admitting a
    herd is cheap to do and slow to undo: shrinking only parks agents at their next step
    boundary, and their calls already queued in vLLM must be served first."""
    _footprint: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check("fill", self.fill, 0.0, lo_open=True)
        _check("smoothing", self.smoothing, 0.0, 1.0, lo_open=True)
        if self.ramp is not None:
            _check("ramp", self.ramp, 1.0, lo_open=True)

    def estimate(self, sample: Sample) -> int | None:
        """Update the footprint with ``sample``; the window it implies, or None if unknown."""
        f = _footprint(sample)
        if f is not None:
            prev = self._footprint
            self._footprint = f if prev is None else prev + self.smoothing * (f - prev)
        cap = sample.kv_capacity_tokens
        if self._footprint is None or cap is None:
            return None
        return max(1, math.floor(self.fill * cap / self._footprint))

    def next_window(self, window: int, sample: Sample) -> int:
        """``fill * capacity / footprint``; hold while unknown."""
        w = self.estimate(sample)
        if w is None:
            return window
        if self.ramp is not None:
            w = min(w, max(window + 1, math.floor(window * self.ramp)))
        return w


# ---- loss-based AIMD -------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class LossAimdLaw(LawDefaults):
    """AIMD on loss signals: preemptions and requests waiting for KV capacity.

    Netflix's AIMDLimit with vLLM's losses::

        W' = floor(W * beta)   if preemptions > 0 or waiting_capacity > 0   (a loss)
        W' = W + alpha         otherwise, if the engine is busy (running > 0)
        W' = W                 otherwise

    vLLM's usage gauge cannot see idle agents' prefixes being evicted; a preemption or a
    request held back for KV space is unambiguous evidence that the batch does not fit.
    Starts at the controller's initial window (slow start from there).
    """

    alpha: int = 1
    """Additive increase per loss-free tick, in agents."""
    beta: float = 0.8
    """Multiplicative decrease on a loss (0 < beta < 1)."""
    starts_open: bool = False
    """AIMD starts small and probes upward."""

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, int) or isinstance(self.alpha, bool) or self.alpha < 1:
            raise ConfigError(f"alpha: must be an integer >= 1, got {self.alpha!r}")
        _check("beta", self.beta, 0.0, 1.0, lo_open=True)
        if self.beta >= 1:
            raise ConfigError(f"beta: must be < 1, got {self.beta!r}")

    def next_window(self, window: int, sample: Sample) -> int:
        """Decrease on a loss, increase on a busy loss-free tick."""
        if sample.preemptions > 0 or (sample.waiting_capacity or 0) > 0:
            return math.floor(window * self.beta)
        if sample.running > 0:
            return window + self.alpha
        return window


# ---- goodput-verified restriction -------------------------------------------------------------

_Phase = Literal["open", "settle", "trial", "restricted"]


@dataclass(slots=True, kw_only=True)
class GoodputLaw(LawDefaults):
    """Admit everyone; restrict only when a measured trial shows the restriction pays.

    Goodput ``g`` is generated tokens per second over a span of samples (the batch's total of
    generated tokens is fixed, so a higher ``g`` is a proportionally shorter batch). The law
    runs a small state machine:

    * **open**: window ``OPEN``. Goodput is measured over the last ``measure_s`` seconds. When
      the KV cache shows pressure (a preemption, a request waiting for capacity) and the
      working-set window ``W_ws = fill * capacity / footprint`` (see :class:`WorkingSetLaw`)
      is below the number of requests the engine holds, and ``backoff_s`` has passed since the
      last trial, a trial starts with the open goodput ``g0`` as the baseline.
    * **settle**: window ``W_ws`` for ``settle_s`` seconds (agents park at their next step
      boundary; the cache refills with the admitted agents' prefixes); not measured.
    * **trial**: window ``W_ws`` (tracking the footprint) for ``measure_s`` seconds; goodput
      ``g1``. If ``g1 >= (1 + margin) * g0`` the restriction pays: go **restricted**. Otherwise
      go back **open** and double ``backoff_s`` (each failed trial costs time, so they get rarer).
    * **restricted**: window ``W_ws``, tracking the footprint as contexts grow.

    Constants: ``margin = 0.1`` (a restriction must win by 10 % to be kept: the baseline is
    measured earlier in the batch and goodput drifts; losing a 10 % gain is cheap, keeping a
    harmful restriction is not); ``settle_s``/``measure_s`` cover at least one agent step.
    """

    fill: float = 1.0
    """Working-set fill factor (see :class:`WorkingSetLaw`)."""
    smoothing: float = 0.3
    """Footprint EWMA weight (see :class:`WorkingSetLaw`)."""
    settle_s: float = 5.0
    """Seconds after a window change before goodput is measured."""
    measure_s: float = 10.0
    """Seconds of goodput measurement on each side of a comparison."""
    margin: float = 0.1
    """Relative goodput gain a restriction must show to be kept."""
    backoff_s: float = 20.0
    """Seconds of open running before the first trial; doubled after each failed trial."""
    starts_open: bool = True
    """Start with every agent admitted."""
    _ws: WorkingSetLaw = field(init=False, repr=False)
    _phase: _Phase = field(default="open", init=False)
    _span: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _phase_s: float = field(default=0.0, init=False)
    _open_s: float = field(default=0.0, init=False)
    _baseline: float = field(default=0.0, init=False)
    _wait_s: float = field(default=0.0, init=False)
    trials: int = field(default=0, init=False)
    """Trials started so far (observability)."""

    def __post_init__(self) -> None:
        _check("fill", self.fill, 0.0, lo_open=True)
        _check("smoothing", self.smoothing, 0.0, 1.0, lo_open=True)
        _check("settle_s", self.settle_s, 0.0)
        _check("measure_s", self.measure_s, 0.0, lo_open=True)
        _check("margin", self.margin, 0.0)
        _check("backoff_s", self.backoff_s, 0.0)
        self._ws = WorkingSetLaw(fill=self.fill, smoothing=self.smoothing)
        self._wait_s = self.backoff_s

    @property
    def phase(self) -> _Phase:
        """Where the state machine is (observability and tests)."""
        return self._phase

    def _goodput(self) -> float:
        secs = sum(s for s, _ in self._span)
        return sum(n for _, n in self._span) / secs if secs > 0 else 0.0

    def _record(self, dt: float, tokens: int) -> None:
        self._span.append((dt, tokens))
        while len(self._span) > 1 and sum(s for s, _ in self._span) - self._span[0][0] >= (
            self.measure_s
        ):
            self._span.popleft()

    def _enter(self, phase: _Phase) -> None:
        self._phase = phase
        self._phase_s = 0.0
        self._span.clear()

    def next_window(self, window: int, sample: Sample) -> int:
        """One step of the state machine (see the class docstring)."""
        ws = self._ws.estimate(sample)
        dt = sample.interval_s or 0.0
        self._phase_s += dt
        if self._phase == "open":
            self._open_s += dt
            self._record(dt, sample.generation_tokens)
            pressure = sample.preemptions > 0 or (sample.waiting_capacity or 0) > 0
            engine_holds = sample.running + sample.waiting
            if (
                pressure
                and ws is not None
                and ws < engine_holds
                and self._open_s >= self._wait_s
                and self._phase_s >= self.measure_s
            ):
                self._baseline = self._goodput()
                self.trials += 1
                self._enter("settle")
                return ws
            return OPEN
        if self._phase == "settle":
            if self._phase_s >= self.settle_s:
                self._enter("trial")
            return window if ws is None else ws
        if self._phase == "trial":
            self._record(dt, sample.generation_tokens)
            if self._phase_s >= self.measure_s:
                if self._goodput() >= (1 + self.margin) * self._baseline:
                    self._enter("restricted")
                else:
                    self._wait_s = self._open_s + 2 * self._wait_s
                    self._enter("open")
                    return OPEN
            return window if ws is None else ws
        return window if ws is None else ws


# ---- hill climber on goodput over a working-set multiplier ------------------------------------

_ClimbPhase = Literal["base", "settle", "probe"]


@dataclass(slots=True, kw_only=True)
class ClimbLaw(LawDefaults):
    """Working-set window scaled by a multiplier ``k`` that a hill climber on goodput learns.

    ``W = max(1, floor(k * capacity / F))`` with ``F`` the smoothed per-agent KV footprint (as
    :class:`WorkingSetLaw`). The window may grow by at most ``ramp`` per tick (slow start: a
    herd admitted at once can only be drained one step boundary at a time, so it is never let
    in; shrinking is immediate). ``k`` starts at 1 (the contexts of all admitted agents fit)
    and moves by factors of ``step``:

    * **base**: measure goodput ``g0`` (generated tokens/s) over ``measure_s``; then
    * **settle** + **probe**: try ``k * step`` (up) or ``k / step`` (down), alternating, wait
      ``settle_s``, measure ``g1`` over ``measure_s``; keep the new ``k`` if
      ``g1 >= (1 + margin) * g0``, else return to the old one. A direction that failed
      ``patience`` times in a row is probed half as often.

    Up-probes find servers where recompute is cheap and batch size precious (CPU: ``k`` climbs
    until the window covers every agent); down-probes find workloads whose working set is
    smaller than the footprint suggests. A probe's cost is bounded: one ``step`` factor for
    ``settle_s + measure_s``.
    """

    fill: float = 1.0
    """Initial ``k``."""
    step: float = 2.0
    """Probe factor on ``k`` (> 1)."""
    k_min: float = 0.25
    """Smallest ``k``."""
    k_max: float = 64.0
    """Largest ``k``."""
    ramp: float = 1.5
    """Most the window may grow in one tick, as a factor (slow start)."""
    smoothing: float = 0.3
    """Footprint EWMA weight."""
    settle_s: float = 3.0
    """Seconds after a change of ``k`` before goodput is measured."""
    measure_s: float = 6.0
    """Seconds of goodput measurement on each side of a comparison."""
    margin: float = 0.05
    """Relative goodput gain a probe must show to be kept."""
    starts_open: bool = False
    """Slow start from the controller's initial window."""
    _ws: WorkingSetLaw = field(init=False, repr=False)
    _k: float = field(default=1.0, init=False)
    _k_old: float = field(default=1.0, init=False)
    _phase: _ClimbPhase = field(default="base", init=False)
    _phase_s: float = field(default=0.0, init=False)
    _tokens: int = field(default=0, init=False)
    _secs: float = field(default=0.0, init=False)
    _baseline: float = field(default=0.0, init=False)
    _up_next: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        _check("fill", self.fill, 0.0, lo_open=True)
        _check("step", self.step, 1.0, lo_open=True)
        _check("ramp", self.ramp, 1.0, lo_open=True)
        _check("settle_s", self.settle_s, 0.0)
        _check("measure_s", self.measure_s, 0.0, lo_open=True)
        _check("margin", self.margin, 0.0)
        self._ws = WorkingSetLaw(fill=1.0, smoothing=self.smoothing)
        self._k = self._k_old = self.fill

    @property
    def k(self) -> float:
        """The multiplier now."""
        return self._k

    def _goodput(self) -> float:
        return self._tokens / self._secs if self._secs > 0 else 0.0

    def _enter(self, phase: _ClimbPhase) -> None:
        self._phase, self._phase_s, self._tokens, self._secs = phase, 0.0, 0, 0.0

    def next_window(self, window: int, sample: Sample) -> int:
        """One tick: climb, then size the window (see the class docstring)."""
        dt = sample.interval_s or 0.0
        self._phase_s += dt
        if self._phase != "settle":
            self._tokens += sample.generation_tokens
            self._secs += dt
        if self._phase == "base" and self._phase_s >= self.measure_s:
            self._baseline = self._goodput()
            self._k_old = self._k
            up = self._up_next
            self._up_next = not up
            k = self._k * self.step if up else self._k / self.step
            if self.k_min <= k <= self.k_max:
                self._k = k
                self._enter("settle")
            else:
                self._enter("base")
        elif self._phase == "settle" and self._phase_s >= self.settle_s:
            self._enter("probe")
        elif self._phase == "probe" and self._phase_s >= self.measure_s:
            if self._goodput() < (1 + self.margin) * self._baseline:
                self._k = self._k_old
            self._enter("base")
        ws = self._ws.estimate(sample)
        if ws is None:
            return window
        target = max(1, math.floor(self._k * ws))
        return min(target, max(window + 1, math.floor(window * self.ramp)))


# ---- verified multiplicative descent from an open start ---------------------------------------

_DescentPhase = Literal["open", "settle", "measure", "hold"]


@dataclass(slots=True, kw_only=True)
class DescentLaw(LawDefaults):
    """Start open; under KV pressure halve the window while goodput does not get worse.

    Goodput ``g`` is generated tokens per second (the batch's generated total is fixed, so
    ``g`` is inversely proportional to the time left). The state machine:

    * **open**: window ``OPEN`` (no control, no cost where there is no pressure). Goodput is
      measured over the last ``measure_s``. On pressure (a preemption or a request waiting for
      KV capacity) after at least ``wait_s`` of open running, the baseline ``g0`` is taken and
      the first trial window is half the requests the engine holds (``(running + waiting)//2``).
    * **settle**: the trial window is set; wait until the engine holds no more requests than
      the window (the parked agents' in-flight calls have drained out of vLLM: a shrink only
      takes effect at step boundaries) or ``max_settle_s``, and at least ``settle_s``.
    * **measure**: goodput ``g1`` over ``measure_s``. If ``g1 >= (1 - tolerance) * g0`` the
      smaller window is no worse: keep it, ``g0 = g1``, and try half of it (down to 1). If it is
      worse, go back to the previous window: ``OPEN`` after the first trial (with ``wait_s``
      doubled, so a server where restriction never pays sees ever rarer trials), else **hold**
      the previous (last good) window.
    * **hold**: keep the window; after ``hold_s`` re-open the descent from twice the window
      (contexts grow and shrink over a batch; the right window moves with them).

    Why halving "while not worse" rather than "while better": throughput against the window
    has a cliff (paper-256 on the H100 preset: static 64 is barely better than no control,
    static 32 is 2.5x better), so a climber that demands a gain at every step stops on the
    plateau. The tolerance bounds what one step can lose; a server where smaller windows are
    always worse (a CPU vLLM) rejects the first halving and stays open.
    """

    settle_s: float = 3.0
    """Least seconds between a window change and its measurement."""
    max_settle_s: float = 60.0
    """Most seconds to wait for the engine queue to drain after a shrink."""
    measure_s: float = 10.0
    """Seconds of goodput measurement for each comparison."""
    tolerance: float = 0.03
    """Relative goodput loss a halving may show and still be kept."""
    wait_s: float = 10.0
    """Seconds of open running before the first trial; doubled after each failed first trial."""
    hold_s: float = 120.0
    """Seconds a settled window is held before the descent is tried again."""
    starts_open: bool = True
    """Start with every agent admitted."""
    _phase: _DescentPhase = field(default="open", init=False)
    _phase_s: float = field(default=0.0, init=False)
    _open_s: float = field(default=0.0, init=False)
    _span: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _baseline: float = field(default=0.0, init=False)
    _trial: int = field(default=OPEN, init=False)
    _good: int = field(default=OPEN, init=False)
    trials: int = field(default=0, init=False)
    """Trial windows measured so far (observability)."""

    def __post_init__(self) -> None:
        _check("settle_s", self.settle_s, 0.0)
        _check("max_settle_s", self.max_settle_s, 0.0)
        _check("measure_s", self.measure_s, 0.0, lo_open=True)
        _check("tolerance", self.tolerance, 0.0, 1.0)
        _check("wait_s", self.wait_s, 0.0)
        _check("hold_s", self.hold_s, 0.0)

    @property
    def phase(self) -> _DescentPhase:
        """Where the state machine is."""
        return self._phase

    def _goodput(self) -> float:
        secs = sum(s for s, _ in self._span)
        return sum(n for _, n in self._span) / secs if secs > 0 else 0.0

    def _record(self, dt: float, tokens: int) -> None:
        self._span.append((dt, tokens))
        while len(self._span) > 1 and sum(s for s, _ in self._span) - self._span[0][0] >= (
            self.measure_s
        ):
            self._span.popleft()

    def _enter(self, phase: _DescentPhase) -> None:
        self._phase, self._phase_s = phase, 0.0
        self._span.clear()

    def _try(self, window: int) -> int:
        self._trial = max(1, window)
        self.trials += 1
        self._enter("settle")
        return self._trial

    def next_window(self, window: int, sample: Sample) -> int:
        """One step of the state machine (see the class docstring)."""
        dt = sample.interval_s or 0.0
        self._phase_s += dt
        held = sample.running + sample.waiting
        if self._phase == "open":
            self._open_s += dt
            self._record(dt, sample.generation_tokens)
            pressure = sample.preemptions > 0 or (sample.waiting_capacity or 0) > 0
            if pressure and self._open_s >= self.wait_s and self._phase_s >= self.measure_s:
                self._baseline = self._goodput()
                self._good = OPEN
                return self._try(held // 2)
            return OPEN
        if self._phase == "settle":
            drained = held <= self._trial
            if self._phase_s >= self.settle_s and (drained or self._phase_s >= self.max_settle_s):
                self._enter("measure")
            return self._trial
        if self._phase == "measure":
            self._record(dt, sample.generation_tokens)
            if self._phase_s < self.measure_s:
                return self._trial
            g = self._goodput()
            if g >= (1 - self.tolerance) * self._baseline:
                self._baseline, self._good = g, self._trial
                if self._trial > 1:
                    return self._try(self._trial // 2)
                self._enter("hold")
                return self._good
            if self._good == OPEN:
                self.wait_s = self._open_s + 2 * self.wait_s
                self._enter("open")
                return OPEN
            self._enter("hold")
            return self._good
        # hold
        if self._phase_s >= self.hold_s:
            self._record(dt, sample.generation_tokens)
            self._baseline = self._goodput() if self._span else self._baseline
            return self._try(2 * self._good)
        return self._good


# ---- token budget with risk-bounded, goodput-verified widening --------------------------------

_ProbePhase = Literal["free", "trial", "base", "settle", "probe", "confirm"]


@dataclass(slots=True, kw_only=True)
class ProbeLaw(LawDefaults):
    """No control until over-subscription gets costly to undo; then a verified token budget,
    widened by probes whose risk is bounded.

    Quantities: ``A`` agents admitted (proposed sample field ``agents_admitted``; without it
    the requests the engine holds), ``B`` the :class:`TokenBudgetLaw` target (agents whose
    contexts fit the KV cache, ``fill = 0.9``), ``F`` the mean agent context, ``R`` the
    fastest prefill rate seen (``prompt_tokens * (1 - hit rate) / interval``: prompt tokens
    are counted when a prefill *completes*, so admission bursts do not inflate it; a lower
    bound of the engine's rate, which errs towards restricting), ``g`` goodput (generated
    tokens per second; the batch's total is fixed, so ``g`` is inversely proportional to the
    time left). Phases:

    * **free** (start): window ``OPEN``. While ``(A - B) * F / R <= probe_cost_s`` (parking
      the agents beyond the budget later would cost at most that much recompute) it stays
      free: where nothing needs control, nothing is paid. Past the bound it starts a trial
      (at most every ``backoff_s``, doubled after each failed trial), with ``g0`` the free
      goodput of the last ``measure_s``.
    * **trial**: window ``B`` for ``settle_s + measure_s``; goodput ``g1`` over the last
      ``measure_s``. Kept (**base**) if ``g1 >= (1 + margin) * g0``; otherwise back to
      **free**. On a server where recompute is cheap the trial fails and costs a few seconds
      of a smaller window; where a herd would thrash it wins at once.
    * **base** / **settle** / **probe**: window ``floor(k * B)`` (``k`` from 1). While agents
      queue at the gate, measure ``g0`` over ``measure_s``, widen by
      ``D = max(1, min(probe_cost_s * R / F, max_probe * W))`` agents (a failed probe costs about
      ``D * F / R <= probe_cost_s`` seconds of recompute), wait ``settle_s``, measure ``g1``;
      if ``g1 >= (1 + margin) * g0``, **confirm**: back to the old window for ``settle_s +
      measure_s`` and measure ``g2``; keep the wider ``k`` only if also
      ``g1 >= (1 + margin) * g2`` (A-B-A cancels the drift of goodput over a batch, which made
      warm-up probes look good); otherwise revert and back off.
    A kept probe that admitted every queued agent returns to **free**.

    Why not simply start restricted: a slow start costs every short or light batch its first
    seconds (10-30 % on light-8 and real-24). Why not simply stay open and restrict on
    thrashing: shrinking revokes nothing, the admitted agents park only at their next step
    boundary, behind their calls queued in vLLM, so a herd takes minutes to drain (the open-start
    laws lost 1.5-2x on paper-256). The bound on undo cost decides between the two from
    measured rates, not from fixed thresholds on usage or hit rate.
    """

    fill: float = 0.9
    """Budget fill factor (see :class:`TokenBudgetLaw`): 0.9 was best on paper-256."""
    horizon_s: float = 30.0
    """Budget footprint horizon (see :class:`TokenBudgetLaw`)."""
    probe_cost_s: float = 5.0
    """Most seconds of recompute an over-subscription (free) or a failed probe may cost."""
    settle_s: float = 2.0
    """Seconds after a window change before its goodput is measured."""
    measure_s: float = 4.0
    """Seconds of goodput measurement for each side of a comparison."""
    margin: float = 0.05
    """Relative goodput gain a trial or a probe must show to be kept."""
    backoff_s: float = 10.0
    """Seconds to wait after a failed trial or probe; doubled after each failure."""
    ramp: float = 2.0
    """Most the restricted window may grow in one tick (outside probes), as a factor."""
    rate_window_s: float = 5.0
    """Seconds over which prefilled tokens are summed to estimate the prefill rate ``R`` (a
    per-tick ratio is inflated by bursts: the prompt counter and the hit rate are counted at
    different moments of a request)."""
    max_probe: float = 0.25
    """Largest probe, as a fraction of the current window (bounds the damage of a rate
    misestimate)."""
    starts_open: bool = True
    """Start with every agent admitted (phase **free**)."""
    _budget: TokenBudgetLaw = field(init=False, repr=False)
    _k: float = field(default=1.0, init=False)
    _k_old: float = field(default=1.0, init=False)
    _phase: _ProbePhase = field(default="free", init=False)
    _phase_s: float = field(default=0.0, init=False)
    _span: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _baseline: float = field(default=0.0, init=False)
    _wait_s: float = field(default=0.0, init=False)
    _free_wait_s: float = field(default=0.0, init=False)
    _rate: float = field(default=0.0, init=False)
    _probe_opens: bool = field(default=False, init=False)
    _probe_g: float = field(default=0.0, init=False)
    _prefill: deque[tuple[float, float]] = field(default_factory=deque, init=False, repr=False)
    probes: int = field(default=0, init=False)
    """Probes started so far (observability)."""
    trials: int = field(default=0, init=False)
    """Restriction trials started so far (observability)."""

    def __post_init__(self) -> None:
        _check("probe_cost_s", self.probe_cost_s, 0.0, lo_open=True)
        _check("settle_s", self.settle_s, 0.0)
        _check("measure_s", self.measure_s, 0.0, lo_open=True)
        _check("margin", self.margin, 0.0)
        _check("backoff_s", self.backoff_s, 0.0)
        _check("ramp", self.ramp, 1.0, lo_open=True)
        self._budget = TokenBudgetLaw(fill=self.fill, horizon_s=self.horizon_s)
        if not self.starts_open:
            self._phase = "base"

    @property
    def phase(self) -> _ProbePhase:
        """Where the state machine is."""
        return self._phase

    @property
    def k(self) -> float:
        """The learned multiplier on the budget."""
        return self._k

    def undo_cost_s(self, excess: float) -> float:
        """Seconds of prefill to recompute the contexts of ``excess`` agents (inf if unknown)."""
        footprint = self._budget.last_footprint
        if excess <= 0:
            return 0.0
        if footprint is None or self._rate <= 0:
            return math.inf
        return excess * footprint / self._rate

    def _enter(self, phase: _ProbePhase) -> None:
        self._phase, self._phase_s = phase, 0.0
        self._span.clear()

    def _record(self, dt: float, tokens: int) -> None:
        self._span.append((dt, tokens))
        while len(self._span) > 1 and sum(d for d, _ in self._span) - self._span[0][0] >= (
            self.measure_s
        ):
            self._span.popleft()

    def _goodput(self) -> float:
        secs = sum(d for d, _ in self._span)
        return sum(n for _, n in self._span) / secs if secs > 0 else 0.0

    def _fail(self) -> None:
        self._wait_s = 2 * self._wait_s if self._wait_s > 0 else self.backoff_s

    def next_window(self, window: int, sample: Sample) -> int:
        """One tick (see the class docstring)."""
        dt = sample.interval_s or 0.0
        hit = sample.prefix_hit_rate if sample.prefix_hit_rate is not None else 0.0
        self._prefill.append((dt, sample.prompt_tokens * (1.0 - hit)))
        while len(self._prefill) > 1 and sum(d for d, _ in self._prefill) - self._prefill[0][0] >= (
            self.rate_window_s
        ):
            self._prefill.popleft()
        secs = sum(d for d, _ in self._prefill)
        if secs >= self.rate_window_s:
            self._rate = max(self._rate, sum(t for _, t in self._prefill) / secs)
        budget = self._budget.target(sample)
        self._phase_s += dt
        counts = gate_counts(sample)
        if self._phase == "free":
            self._record(dt, sample.generation_tokens)
            self._free_wait_s = max(0.0, self._free_wait_s - dt)
            if budget is None:
                return OPEN
            admitted = counts[0] if counts is not None else sample.running + sample.waiting
            if self.undo_cost_s(admitted - budget) <= self.probe_cost_s or self._free_wait_s > 0:
                return OPEN
            self._baseline = self._goodput()
            self.trials += 1
            self._enter("trial")
            return budget
        if budget is None:
            return window
        if self._phase == "trial":
            if self._phase_s > self.settle_s:
                self._record(dt, sample.generation_tokens)
            if self._phase_s < self.settle_s + self.measure_s:
                return budget
            if self._goodput() >= (1 + self.margin) * self._baseline:
                self._enter("base")
                return budget
            self._free_wait_s = self._wait_s = (
                2 * self._wait_s if self._wait_s > 0 else self.backoff_s
            )
            self._enter("free")
            return OPEN
        binding = counts is None or counts[1] > 0
        if self._phase != "settle" and not (
            self._phase == "confirm" and self._phase_s <= self.settle_s
        ):
            self._record(dt, sample.generation_tokens)
        if self._phase == "base":
            if not binding:
                self._enter("base")  # nothing to learn while nobody waits
            elif self._phase_s >= max(self.measure_s, self._wait_s):
                footprint = self._budget.last_footprint or 1.0
                current = max(1.0, self._k * budget)
                extra = max(
                    1.0,
                    min(self.probe_cost_s * self._rate / footprint, self.max_probe * current),
                )
                self._probe_opens = counts is not None and current + extra >= sum(counts)
                self._baseline = self._goodput()
                self._k_old = self._k
                self._k = self._k * (current + extra) / current
                self.probes += 1
                self._enter("settle")
        elif self._phase == "settle" and self._phase_s >= self.settle_s:
            self._enter("probe")
        elif self._phase == "probe" and self._phase_s >= self.measure_s:
            probe_k, self._k = self._k, self._k_old
            if self._goodput() >= (1 + self.margin) * self._baseline:
                # Back to the old window for a second baseline (A-B-A): goodput drifts over a
                # batch (up in the warm-up, down as histories grow), and a probe must beat
                # both sides to be kept.
                self._probe_g, self._k_old = self._goodput(), probe_k
                self._enter("confirm")
            else:
                self._fail()
                self._enter("base")
        elif self._phase == "confirm" and self._phase_s >= self.settle_s + self.measure_s:
            if self._probe_g >= (1 + self.margin) * self._goodput():
                self._k, self._wait_s = self._k_old, 0.0
                if self._probe_opens:
                    # The window now covers every agent: back to free, which keeps it open
                    # for as long as undoing that stays cheap.
                    self._k = 1.0
                    self._enter("free")
                    return OPEN
            else:
                self._fail()
            self._enter("base")
        target = max(1, math.floor(self._k * budget))
        if self._phase in ("settle", "probe"):
            return target
        return min(target, max(window + 1, math.floor(window * self.ramp)))


# ---- victim and resume policies --------------------------------------------------------------

Victim = Literal["newest", "smallest"]
Resume = Literal["fifo", "bfd"]


class PolicyWindow(LocalWindow):
    """:class:`LocalWindow` with another victim choice and resume order (lab only).

    ``victim``: which holders park when holders exceed the window: ``"newest"`` (the package's
    rule: the most recently admitted) or ``"smallest"`` (the holders with the smallest contexts,
    newest first among equals: ThunderAgent pauses the smallest program first).
    ``resume``: which parked agent a free slot goes to: ``"fifo"`` (the package's rule: in the
    order they parked) or ``"bfd"`` (best-fit decreasing, ThunderAgent's bin packing: the
    largest parked context that fits the tokens the holders leave free of ``budget_tokens``;
    when none fits, the smallest). New agents still come after parked ones, in order.

    ``size(agent_id)`` is the agent's context in tokens (the lab records each call's usage).
    The package's window has no hook for either choice: this subclass overrides
    :meth:`LocalWindow.must_park` and the private ``_wake`` (docs/laws.md says what a core
    hook would take). O(holders) per step boundary and per wake-up: a lab tool, not a fast path.
    """

    def __init__(
        self,
        limit: int,
        *,
        size: Callable[[str], float],
        budget_tokens: float,
        victim: Victim = "newest",
        resume: Resume = "fifo",
    ) -> None:
        if victim not in ("newest", "smallest"):
            raise ConfigError(f"victim: must be 'newest' or 'smallest', got {victim!r}")
        if resume not in ("fifo", "bfd"):
            raise ConfigError(f"resume: must be 'fifo' or 'bfd', got {resume!r}")
        super().__init__(limit)
        self._size = size
        self._budget = budget_tokens
        self._victim = victim
        self._resume = resume

    def must_park(self, permit: Permit) -> bool:
        if self._victim == "newest":
            return super().must_park(permit)
        excess = len(self._holders) - self._limit
        if excess <= 0 or permit.released:
            return False
        ranked = sorted(self._holders.values(), key=lambda p: (self._size(p.agent_id), -p.seq))
        return any(p is permit for p in ranked[:excess])

    def _wake(self) -> None:
        if self._resume == "bfd":
            parked = self._waiting_parked
            while len(self._holders) < self._limit and parked:
                if self._cancelled[True]:
                    live = [w for w in parked if not w.future.done()]
                    parked.clear()
                    parked.extend(live)
                    self._cancelled[True] = 0
                    continue
                free = self._budget - sum(self._size(p.agent_id) for p in self._holders.values())
                fits = [w for w in parked if self._size(w.agent_id) <= free]
                if fits:
                    pick = max(fits, key=lambda w: self._size(w.agent_id))
                else:
                    pick = min(parked, key=lambda w: self._size(w.agent_id))
                parked.remove(pick)
                pick.future.set_result(self._grant(pick.agent_id, True))
        super()._wake()


# ---- FitLaw with newcomers sized by the active agents ----------------------------------------

Newcomer = Literal["mean", "young", "outside", "floor"]


@dataclass(slots=True, kw_only=True)
class NewcomerFitLaw(FitLaw):
    """``FitLaw`` with some agents sized at the active agents' mean context ``m`` when their own
    context is smaller (issue 15's proposal: a newcomer sized at its first context lets the
    window swing up as agents finish, then park the newcomers a step later)::

        size_i = max(context_i, m) + g       for the agents that ``newcomer`` names
        m      = mean context of the active agents that called at least once

    ``newcomer``: ``"mean"`` the agents that never called (``FitLaw`` sizes them at the mean
    first context); ``"young"`` also those with fewer steps than the active agents' median;
    ``"outside"`` every agent not holding a slot (parked or waiting); ``"floor"`` every agent.
    The sizes feed both the fit and the undo-cost guard (the agents' accounts are rewritten
    with the floor, growth kept: ``first_context`` moves with ``context``). docs/laws.md has
    the numbers: none beat ``FitLaw``.
    """

    newcomer: Newcomer = "young"
    """Which agents are sized at least at the active agents' mean context."""

    def __post_init__(self) -> None:
        FitLaw.__post_init__(self)
        if self.newcomer not in ("mean", "young", "outside", "floor"):
            raise ConfigError(
                f"newcomer: must be 'mean', 'young', 'outside' or 'floor', got {self.newcomer!r}"
            )

    def next_window(self, window: int, sample: Sample) -> int:
        agents = sample.agents
        if agents:
            sample = dataclasses.replace(sample, agents=tuple(self.sized(agents)))
        return FitLaw.next_window(self, window, sample)

    def sized(self, agents: tuple[AgentAccount, ...]) -> list[AgentAccount]:
        """The accounts with the floor applied (unchanged when no agent has called yet)."""
        known = [a for a in agents if a.steps > 0]
        active = [a for a in known if a.state == "active"] or known
        if not active:
            return list(agents)
        mean = sum(a.context for a in active) / len(active)
        first = sum(a.first_context for a in known) / len(known)
        steps = sorted(a.steps for a in active)
        median = steps[len(steps) // 2]
        out = []
        for a in agents:
            named = (
                (self.newcomer == "mean" and a.steps == 0)
                or (self.newcomer == "young" and a.steps < median)
                or (self.newcomer == "outside" and a.state != "active")
                or self.newcomer == "floor"
            )
            if named and a.steps == 0:
                size = max(first, mean)
                a = dataclasses.replace(a, context=round(size), first_context=round(size), steps=1)
            elif named and a.context < mean:
                lift = round(mean) - a.context
                a = dataclasses.replace(
                    a, context=a.context + lift, first_context=a.first_context + lift
                )
            out.append(a)
        return out


@dataclass(slots=True, kw_only=True)
class KeepLargestFitLaw(FitLaw):
    """``FitLaw`` with the admitted agents counted largest context first.

    ``FitLaw`` counts the agents in admission order because the window parks the most recently
    admitted: the agents it counts first are the ones that stay. Under a smallest-first victim
    rule (``PolicyWindow(victim="smallest")``) the largest stay, so the fit must count them
    first, or it keeps a set larger than it measured. Parked and waiting agents keep their
    order (they are served in it).
    """

    def next_window(self, window: int, sample: Sample) -> int:
        agents = sample.agents
        if agents:
            active = sorted((a for a in agents if a.state == "active"), key=lambda a: -a.context)
            rest = [a for a in agents if a.state != "active"]
            sample = dataclasses.replace(sample, agents=(*active, *rest))
        return FitLaw.next_window(self, window, sample)


@dataclass(slots=True, kw_only=True)
class SharedPrefixFitLaw(FitLaw):
    """``FitLaw`` with the prefix every agent shares (the system prompt) counted once.

    The cache holds a shared prefix once; ``FitLaw`` counts it in every agent's context. The
    shared prefix is estimated as ThunderAgent's peer law does, by the smallest first context
    of the agents that called (no agent's own tokens can be below it; it also holds the
    smallest task and first answer, so it overestimates by those), scaled by ``share``. Each
    agent's account is lowered by it, and the budget by it once. ``share = 0`` is ``FitLaw``.
    """

    share: float = 1.0
    """Fraction of the smallest first context taken as shared."""

    def next_window(self, window: int, sample: Sample) -> int:
        agents = sample.agents
        capacity = sample.kv_capacity_tokens
        firsts = [a.first_context for a in agents or () if a.steps > 0]
        if agents and capacity and firsts:
            shared = round(self.share * min(firsts))
            lowered = tuple(
                dataclasses.replace(
                    a,
                    context=max(0, a.context - shared),
                    first_context=max(0, a.first_context - shared),
                )
                if a.steps > 0
                else a
                for a in agents
            )
            sample = dataclasses.replace(
                sample,
                agents=lowered,
                kv_capacity_tokens=max(1, capacity - round(shared / self.fill)),
            )
        return FitLaw.next_window(self, window, sample)

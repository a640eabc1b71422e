"""The default law, ``AdmitLaw``: no control while over-subscription is cheap to undo, a
verified token budget when it is not.

Why the paper's law is not enough: whether restricting concurrency pays depends on the cost of
recomputing evicted prefixes against the cost of leaving the engine under-used while admitted
agents sit in tool calls. On an H100 with Qwen3-32B recompute dominates (the paper measures 2-4x
gains); on a CPU vLLM with a tiny model it is cheap and batch size is precious, and every
restriction made the batch slower. Fixed KV / hit-rate thresholds cannot tell the two apart:
both servers show the same signals (cache full, hit rate collapsing, preemptions).
docs/laws.md has the measurements that chose this law over the other candidates (which live in
``benchmarks/lab_laws.py`` for the law lab).

The law is a pure object (no I/O, no clock, no asyncio): state is kept across calls, time is
the samples' ``interval_s``. It starts with every agent admitted (``starts_open``); ``OPEN`` is
what it returns for "no restriction", which the controller clamps to ``max_window``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from concur_langgraph.checks import check_number
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.signals import Sample
from concur_langgraph.core.window import OPEN
from concur_langgraph.errors import ConfigError
from concur_langgraph.laws.profile import BatchProfile

__all__ = ["AdmitLaw", "TokenBudgetLaw", "gate_counts", "requests_finished"]


def _check(
    name: str, value: object, lo: float, hi: float = math.inf, *, lo_open: bool = False
) -> None:
    check_number(name, value, low=lo, high=hi, low_open=lo_open)


def requests_finished(sample: Sample) -> int | None:
    """Requests finished over the interval (the delta of ``vllm:request_success_total``), or
    None when the server does not export it."""
    return sample.requests_finished


def gate_counts(sample: Sample) -> tuple[int, int] | None:
    """``(agents_admitted, agents_queued)``, filled by the controller from the window's
    statistics (holders; waiters new and parked), or None for a sample it did not fill."""
    admitted, queued = sample.agents_admitted, sample.agents_queued
    if admitted is None or queued is None:
        return None
    return admitted, queued


@dataclass(slots=True, kw_only=True)
class TokenBudgetLaw(LawDefaults):
    """A stable token budget: the window is the KV capacity over the mean agent context.

    ::

        F  = sum(prompt_tokens + generation_tokens) / sum(requests_finished)   over horizon_s
        W* = max(1, floor(fill * kv_capacity_tokens / F))
        W' = W* if |W* - W| >= max(2, deadband * W) else W      (growth limited by ``ramp``)

    ``F`` is the length of an agent's history at the end of a step (vLLM's prompt counter counts
    a whole prompt, cached or not), averaged as a ratio of sums over the last ``horizon_s``
    seconds: per-tick ratios are noisy (few requests finish in a second) and a window that
    jitters is expensive, because every park evicts the parked agent's prefix and its resume
    recomputes it. Without the ``requests_finished`` field it falls back to the cache's view,
    ``sum(kv_usage * capacity) / sum(running)`` over the horizon.

    It decides *how many* agents fit, never *whether* restricting pays: on a server where
    recompute is cheap it is slower than no control (docs/laws.md).
    """

    fill: float = 1.0
    """Fraction of the KV cache the admitted agents' contexts may fill (> 0)."""
    horizon_s: float = 30.0
    """Seconds of samples the footprint is averaged over."""
    deadband: float = 0.1
    """Relative change of the target below which the window is kept."""
    ramp: float = 1.5
    """Most the window may grow in one tick, as a factor (slow start)."""
    starts_open: bool = False
    """Slow start from the controller's initial window (a herd is slow to drain)."""
    _span: deque[tuple[float, float, float, float, float]] = field(
        default_factory=deque, init=False, repr=False
    )
    _running: int = field(default=0, init=False, repr=False)
    last_footprint: float | None = field(default=None, init=False)
    """The mean agent context of the last update (tokens), None while unknown."""

    def __post_init__(self) -> None:
        _check("fill", self.fill, 0.0, lo_open=True)
        _check("horizon_s", self.horizon_s, 0.0, lo_open=True)
        _check("deadband", self.deadband, 0.0, 1.0)
        _check("ramp", self.ramp, 1.0, lo_open=True)

    def footprint(self, sample: Sample) -> float | None:
        """Add ``sample`` to the horizon; the mean agent context, or None if unknown.

        With ``requests_finished``: ``sum(prefix_queries) / sum(admitted) + sum(generation) /
        sum(finished)``, where ``admitted = finished + running - running_before`` (requests
        that entered the running batch in the interval). vLLM counts a prompt as queried when
        it is admitted, so numerator and denominator count the same requests at the same time
        even when requests last longer than the horizon (a herd's first prompts), and it does
        not depend on what the cache holds now. Without it: the cache's view,
        ``kv_usage * capacity / running`` summed over the horizon, which is biased low while
        requests sit half-prefilled in the running batch.
        """
        finished = requests_finished(sample)
        if finished is not None:
            admitted = finished + sample.running - self._running
            row = (
                float(sample.prefix_queries),
                float(admitted),
                float(sample.generation_tokens),
                float(finished),
            )
        elif sample.kv_capacity_tokens is not None and sample.running > 0:
            row = (sample.kv_usage * sample.kv_capacity_tokens, float(sample.running), 0.0, 0.0)
        else:
            row = (0.0, 0.0, 0.0, 0.0)
        self._running = sample.running
        self._span.append((sample.interval_s or 0.0, *row))
        while len(self._span) > 1 and sum(x[0] for x in self._span) - self._span[0][0] >= (
            self.horizon_s
        ):
            self._span.popleft()
        count = sum(x[2] for x in self._span)
        if count <= 0:
            self.last_footprint = None
            return None
        done = sum(x[4] for x in self._span)
        output = sum(x[3] for x in self._span) / done if done > 0 else 0.0
        self.last_footprint = sum(x[1] for x in self._span) / count + output
        return self.last_footprint

    def target(self, sample: Sample) -> int | None:
        """The window the budget allows (updates the footprint), or None if unknown."""
        f = self.footprint(sample)
        cap = sample.kv_capacity_tokens
        if f is None or f <= 0 or cap is None:
            return None
        return max(1, math.floor(self.fill * cap / f))

    def next_window(self, window: int, sample: Sample) -> int:
        """Move to the budget's window when it differs enough; grow by ``ramp`` at most."""
        w = self.target(sample)
        if w is None or abs(w - window) < max(2, self.deadband * window):
            return window
        return min(w, max(window + 1, math.floor(window * self.ramp)))


# ---- the default candidate: free until costly to undo, then a verified token budget -----------

_AdmitPhase = Literal["free", "trial", "restricted"]


@dataclass(slots=True, kw_only=True)
class AdmitLaw(LawDefaults):
    """No control while over-subscription is cheap to undo; a token budget when it is not,
    verified by a goodput trial whenever there is a free baseline to compare with.

    Quantities: ``A`` agents admitted (proposed sample field ``agents_admitted``; without it,
    the requests the engine holds), ``Q`` agents queued at the gate (proposed
    ``agents_queued``; without it 0), ``B`` the :class:`TokenBudgetLaw` target (agents whose
    contexts fit the KV cache, ``fill = 0.9``), ``F`` the mean agent context, ``R`` the
    prefill rate (the largest average over ``rate_window_s`` of ``prompt_tokens * (1 - hit
    rate)`` per second, from the first sample on: a lower bound of the engine's rate, which
    errs towards restricting), ``g`` goodput (generated tokens per second; the batch's total is
    fixed, so ``g`` is inversely proportional to the time left). The undo cost of ``n`` agents
    beyond the budget is ``n * F / R``: the prefill seconds to recompute their contexts once
    they are parked. Phases:

    * **free** (start): window ``OPEN`` while the undo cost of ``A - B`` is at most
      ``undo_cost_s`` (or unknown: no prefill has completed yet). Past it (and at least
      ``backoff_s`` after a failed trial, doubled each time): a **trial** if the law has
      ``measure_s`` of free goodput ``g0`` to compare with, else straight to **restricted**
      (the first seconds of a batch, when a whole herd's first prompts are in flight and
      there is nothing to compare with).
    * **trial**: window ``B``; once the admitted agents have drained to it (at least
      ``settle_s``, at most ``max_settle_s``: a shrink parks agents only at their step
      boundaries), goodput over ``measure_s``; kept (**restricted**) if ``>= (1 + margin) *
      g0``, else back to **free**.
    * **restricted**: window ``B`` (growth limited to ``ramp`` per tick), tracking the agents'
      contexts as they grow. Back to **free** when the undo cost of admitting everyone,
      ``A + Q - B``, falls to half the bound (recompute got cheap relative to the queue, or
      the queue emptied in the cool-down). A restriction that a trial kept by chance is not
      re-checked: release trials were tried and cost more than they saved (docs/laws.md).

    Why this shape (docs/laws.md has the numbers). A slow start costs every short or light
    batch its first seconds (7-22 % on light-8 and real-24). Staying open until thrashing is
    seen costs a herd: shrinking revokes nothing, admitted agents park only at their next step
    boundary, behind their calls queued in vLLM, so 256 admitted agents take minutes to drain
    (open-start laws ended 2-2.5x slower than the best static window on paper-256). Fixed
    usage / hit-rate thresholds cannot tell a server where recompute is cheap from one where
    it is not (both show a full cache and a collapsing hit rate). The undo-cost bound is
    computed from measured rates and sizes; the trial then checks the gain. Widening probes
    from the budget were tried (:class:`ProbeLaw`) and dropped: more agents always raise
    goodput for the seconds a probe lasts, and the damage (their contexts outgrowing the
    cache) comes minutes later.
    """

    fill: float = 0.9
    """Budget fill factor (see :class:`TokenBudgetLaw`). paper-256: 0.8 / 0.9 / 1.0 / 1.1 ->
    949 / 911 / 890 / 944 s; throughput falls off a cliff on the over-filling side, so 0.9
    keeps a margin from it."""
    horizon_s: float = 30.0
    """Budget footprint horizon (see :class:`TokenBudgetLaw`)."""
    undo_cost_s: float = 10.0
    """Most seconds of recompute an over-subscription may cost before the law restricts."""
    settle_s: float = 2.0
    """Least seconds after the trial starts before its goodput is measured."""
    max_settle_s: float = 30.0
    """Most seconds to wait for the admitted agents to drain down to the trial window."""
    measure_s: float = 4.0
    """Seconds of goodput measurement on each side of the comparison."""
    margin: float = 0.05
    """Relative goodput gain the trial must show to be kept."""
    backoff_s: float = 10.0
    """Seconds of free running after a failed trial before the next; doubled each time."""
    ramp: float = 2.0
    """Most the restricted window may grow in one tick, as a factor."""
    rate_window_s: float = 5.0
    """Seconds over which prefilled tokens are summed to estimate ``R`` (per-tick ratios are
    inflated by bursts: prompts are counted when their prefill ends, hits when admitted)."""
    starts_open: bool = True
    """Start with every agent admitted (phase **free**)."""
    warm: BatchProfile | None = None
    """What a previous batch of the same agent measured (:meth:`profile`), or ``None``.

    A batch learns how large its agents' contexts grow only as they finish, long after an
    open start has admitted them all. With a profile the law applies its own rule at t = 0
    to the agents' whole lives: ``B = fill * capacity / context_per_call``; if the ``N - B``
    agents beyond ``B`` would cost more than ``undo_cost_s`` of prefill to undo (``(N - B) *
    context_per_call / prefill_rate``), the batch starts at ``B`` (:attr:`start_window`) and
    the free phase never opens past it; else it starts open, as without a profile. ``N`` is
    the profile's agent count before the first sample, then the most agents admitted plus
    queued at any tick. A profile measured with another KV capacity is not used. Measured
    (docs/laws.md, through the benchmark harness): demo 281.4 -> 232.2 s, the best static
    window's time; swe-long, light-8, real-24 and the cpu-tiny batches unchanged (they start
    open); paper-256 920.7 -> 927.2 s."""
    _budget: TokenBudgetLaw = field(init=False, repr=False)
    _settled: bool = field(default=False, init=False)
    _phase: _AdmitPhase = field(default="free", init=False)
    _phase_s: float = field(default=0.0, init=False)
    _span: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _prefill: deque[tuple[float, float]] = field(default_factory=deque, init=False, repr=False)
    _rate: float = field(default=0.0, init=False)
    _baseline: float = field(default=0.0, init=False)
    _wait_s: float = field(default=0.0, init=False)
    _next_wait_s: float = field(default=0.0, init=False)
    trials: int = field(default=0, init=False)
    """Trials started so far (observability)."""
    _sampled: bool = field(default=False, init=False)
    _cap: int | None = field(default=None, init=False)
    _capacity: int | None = field(default=None, init=False)
    _agents: int = field(default=0, init=False)
    _tokens: float = field(default=0.0, init=False)
    _requests: int = field(default=0, init=False)
    _measured: bool = field(default=True, init=False)
    _reason: str = field(default="AdmitLaw free: no sample yet: open", init=False)

    def __post_init__(self) -> None:
        if self.warm is not None and not isinstance(self.warm, BatchProfile):
            raise ConfigError(f"warm: expected a BatchProfile or None, got {self.warm!r}")
        _check("fill", self.fill, 0.0, lo_open=True)
        _check("undo_cost_s", self.undo_cost_s, 0.0)
        _check("settle_s", self.settle_s, 0.0)
        _check("max_settle_s", self.max_settle_s, 0.0)
        _check("measure_s", self.measure_s, 0.0, lo_open=True)
        _check("margin", self.margin, 0.0)
        _check("backoff_s", self.backoff_s, 0.0)
        _check("ramp", self.ramp, 1.0, lo_open=True)
        _check("rate_window_s", self.rate_window_s, 0.0, lo_open=True)
        self._budget = TokenBudgetLaw(fill=self.fill, horizon_s=self.horizon_s)
        self._next_wait_s = self.backoff_s

    @property
    def phase(self) -> _AdmitPhase:
        """Where the state machine is."""
        return self._phase

    @property
    def start_window(self) -> int | None:
        """The window the batch should start at, or ``None`` for the usual open start.

        Not ``None`` only with a :attr:`warm` profile that says the batch's agents will
        outgrow the cache (see :attr:`warm`); until the first sample it is judged with the
        profile's own capacity and agent count. The session starts the window here.
        """
        if self._sampled:
            return self._cap
        warm = self.warm
        return None if warm is None else self._warm_cap(warm.kv_capacity_tokens, warm.agents)

    def profile(self) -> BatchProfile | None:
        """What this batch measured, for the next batch of the same agent (``warm``); ``None``
        until a request finished and the prefill rate and KV capacity are known, or when the
        server does not export ``vllm:request_success_total``."""
        if (
            not self._measured
            or self._requests <= 0
            or self._tokens <= 0
            or self._rate <= 0
            or self._capacity is None
            or self._capacity <= 0
            or self._agents <= 0
        ):
            return None
        return BatchProfile(
            context_per_call=self._tokens / self._requests,
            prefill_rate=self._rate,
            kv_capacity_tokens=self._capacity,
            agents=self._agents,
        )

    def _warm_cap(self, capacity: int | None, agents: int) -> int | None:
        warm = self.warm
        if warm is None or capacity is None or capacity <= 0:
            return None
        budget = max(1, math.floor(self.fill * capacity / warm.context_per_call))
        excess = agents - budget
        if excess <= 0 or excess * warm.context_per_call / warm.prefill_rate <= self.undo_cost_s:
            return None
        return budget

    def _measure(self, sample: Sample, admitted: int, queued: int) -> None:
        """Accumulate the batch's profile, and settle the warm start on this sample."""
        finished = requests_finished(sample)
        if finished is None:
            self._measured = False
        else:
            self._tokens += sample.prompt_tokens + sample.generation_tokens
            self._requests += finished
        if sample.kv_capacity_tokens is not None:
            self._capacity = sample.kv_capacity_tokens
        self._agents = max(self._agents, admitted + queued)
        warm = self.warm
        if warm is not None:
            if not self._sampled and sample.kv_capacity_tokens != warm.kv_capacity_tokens:
                # Another server (or configuration): its capacity and prefill rate are not the
                # profile's, so the profile says nothing about this batch.
                self.warm = None
            elif self._cap is None:
                # Set at most once: agents still arriving can make the batch big enough.
                self._cap = self._warm_cap(sample.kv_capacity_tokens, self._agents)
        self._sampled = True

    def _open(self) -> int:
        """The free phase's window: every agent, or the warm start's budget."""
        return OPEN if self._cap is None else self._cap

    @property
    def prefill_rate(self) -> float:
        """``R``, tokens per second (0 until a prefill completed)."""
        return self._rate

    def undo_cost(self, excess: float) -> float:
        """Seconds of prefill to recompute ``excess`` agents' contexts (inf if unknown)."""
        if excess <= 0:
            return 0.0
        footprint = self._budget.last_footprint
        if footprint is None or self._rate <= 0:
            return math.inf
        return excess * footprint / self._rate

    def _enter(self, phase: _AdmitPhase) -> None:
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

    def _observe_rate(self, dt: float, sample: Sample) -> None:
        hit = sample.prefix_hit_rate if sample.prefix_hit_rate is not None else 0.0
        self._prefill.append((dt, sample.prompt_tokens * (1.0 - hit)))
        while len(self._prefill) > 1 and (
            sum(d for d, _ in self._prefill) - self._prefill[0][0] >= self.rate_window_s
        ):
            self._prefill.popleft()
        secs = sum(d for d, _ in self._prefill)
        if secs > 0:
            self._rate = max(self._rate, sum(t for _, t in self._prefill) / secs)

    def explain(self, window: int, sample: Sample) -> str:
        """Why the last :meth:`next_window` returned what it did: the phase and its numbers."""
        return self._reason

    def _budget_text(self, budget: int, sample: Sample) -> str:
        footprint = self._budget.last_footprint
        size = "" if footprint is None else f", {footprint:,.0f} tokens per agent"
        capacity = sample.kv_capacity_tokens
        of = "" if capacity is None else f" of {capacity:,} KV tokens"
        return f"budget {budget} agents (fill {self.fill}{of}{size})"

    def _cost_text(self, excess: int) -> str:
        cost = self.undo_cost(excess)
        return f"undoing {excess} agents costs {cost:.1f} s of prefill at {self._rate:,.0f} tok/s"

    def next_window(self, window: int, sample: Sample) -> int:
        """One tick (see the class docstring)."""
        dt = sample.interval_s or 0.0
        self._observe_rate(dt, sample)
        budget = self._budget.target(sample)
        counts = gate_counts(sample)
        admitted = counts[0] if counts is not None else sample.running + sample.waiting
        queued = counts[1] if counts is not None else 0
        self._measure(sample, admitted, queued)
        self._phase_s += dt
        open_text = "open" if self._cap is None else f"the warm start's {self._cap} agents"
        if self._phase == "free":
            self._record(dt, sample.generation_tokens)
            self._wait_s = max(0.0, self._wait_s - dt)
            # Unknown rates decide nothing: with every agent admitted at the start, their
            # first calls are in flight whatever the window says until the first prefills end.
            if budget is None or self._wait_s > 0 or self._rate <= 0:
                why = (
                    "agents' context sizes not measured yet"
                    if budget is None
                    else f"backing off {self._wait_s:.0f} s after a failed trial"
                    if self._wait_s > 0
                    else "no prefill measured yet"
                )
                self._reason = f"AdmitLaw free: {why}: {open_text}"
                return self._open()
            if self.undo_cost(admitted - budget) <= self.undo_cost_s:
                self._reason = (
                    f"AdmitLaw free: {admitted} admitted, {self._budget_text(budget, sample)}; "
                    f"{self._cost_text(max(0, admitted - budget))} <= undo_cost_s "
                    f"{self.undo_cost_s}: {open_text}"
                )
                return self._open()
            over = (
                f"{self._cost_text(admitted - budget)} > undo_cost_s {self.undo_cost_s}; "
                f"{self._budget_text(budget, sample)}"
            )
            if self._phase_s >= self.measure_s:
                self._baseline = self._goodput()
                self.trials += 1
                self._enter("trial")
                self._reason = (
                    f"AdmitLaw free -> trial: {over}; trying {budget} against the free goodput "
                    f"of {self._baseline:,.0f} tok/s"
                )
            else:
                self._enter("restricted")
                self._reason = (
                    f"AdmitLaw free -> restricted: {over}; no goodput baseline to trial against "
                    f"yet (under measure_s {self.measure_s} s of running)"
                )
            return budget
        if budget is None:
            self._reason = f"AdmitLaw {self._phase}: no KV budget this tick: hold"
            return window
        if self._phase == "trial":
            if not self._settled:
                # Shrinking parks agents only at their step boundaries: measure once the
                # admitted agents fit the window (or after max_settle_s), not before.
                drained = counts is None or admitted <= budget
                if self._phase_s >= self.settle_s and (
                    drained or self._phase_s >= self.max_settle_s
                ):
                    self._settled, self._phase_s = True, 0.0
                self._reason = (
                    f"AdmitLaw trial: settling, {admitted} admitted draining to "
                    f"{self._budget_text(budget, sample)}"
                )
                return budget
            self._record(dt, sample.generation_tokens)
            if self._phase_s < self.measure_s:
                self._reason = (
                    f"AdmitLaw trial: measuring goodput ({self._phase_s:.1f} of "
                    f"{self.measure_s} s) at {self._budget_text(budget, sample)}"
                )
                return budget
            goodput = self._goodput()
            if goodput < (1 + self.margin) * self._baseline:
                self._wait_s, self._next_wait_s = self._next_wait_s, 2 * self._next_wait_s
                self._enter("free")
                self._reason = (
                    f"AdmitLaw trial -> free: goodput {goodput:,.0f} tok/s < (1 + margin "
                    f"{self.margin}) x free {self._baseline:,.0f} tok/s: {open_text}, next "
                    f"trial in {self._wait_s:.0f} s at the earliest"
                )
                return self._open()
            self._enter("restricted")
            self._reason = (
                f"AdmitLaw trial -> restricted: goodput {goodput:,.0f} tok/s >= (1 + margin "
                f"{self.margin}) x free {self._baseline:,.0f} tok/s; "
                f"{self._budget_text(budget, sample)}"
            )
        elif self.undo_cost(admitted + queued - budget) <= self.undo_cost_s / 2:
            self._enter("free")
            self._reason = (
                f"AdmitLaw restricted -> free: {admitted} admitted + {queued} queued, "
                f"{self._budget_text(budget, sample)}; "
                f"{self._cost_text(max(0, admitted + queued - budget))} <= undo_cost_s / 2: "
                f"{open_text}"
            )
            return self._open()
        else:
            self._reason = (
                f"AdmitLaw restricted: {self._budget_text(budget, sample)}, {admitted} admitted,"
                f" {queued} queued; growth at most x ramp {self.ramp} per tick"
            )
        return min(budget, max(window + 1, math.floor(window * self.ramp)))

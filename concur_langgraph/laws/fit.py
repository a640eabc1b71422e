"""``FitLaw``: admit the agents whose contexts fit the KV cache, sized exactly by the gate.

The gate sees every call of every agent, so it knows each agent's context exactly (its last
call's prompt plus completion tokens), idle agents in tool calls included: the tokens vLLM's own
KV usage does not count (it counts running requests only) and the ones that get evicted.
``FitLaw`` reads them from the sample (``Sample.agents``, in admission order) and sets the window
to the number of agents, in that order, whose projected contexts fit ``fill`` of the cache::

    size_i      = context_i + g                (an agent that never called: the mean first
                                                context + g)
    g           = median over agents of (context - first_context) / (steps - 1)
    window      = max n such that sum_{i < n} size_i <= fill * kv_capacity_tokens

``g`` is the growth of one step (observation plus answer), so ``size_i`` is what agent i will
hold after its next call. The window grows to the fit at once and shrinks only when the fit at
``high`` of the cache is smaller than the window (hysteresis: a context that crosses the line
by a few tokens does not park an agent).

It restricts only where restricting pays. Two guards keep it open:

* **Agents mostly in tools.** When fewer than ``busy_min`` of the admitted agents have a call in
  flight (an EMA over ``share_s`` seconds), an evicted idle prefix is recomputed only when its
  agent returns, and a smaller window mostly idles the engine: no restriction. (swe-long: agents
  wait on heavy-tailed tools, a third of them in the engine, and every window below the batch
  was slower than no control.)
* **Cheap to undo.** When recomputing the contexts of every agent beyond the fit would take at
  most ``undo_cost_s`` of prefill at the server's measured rate, over-subscription costs less
  than a restriction: no restriction. (Many short agents: their contexts are small.) Once the
  law restricts, this guard lifts the restriction only at ``reopen * undo_cost_s``: the
  estimate prices one recompute of the agents beyond the fit, but when the cache is full they
  evict each other every step for the rest of their lives (medium-wide's last 19 agents,
  opened at 5.0 s of undo cost, thrashed).

Constants and where they come from (docs/laws.md, the simulator's law lab): ``fill`` 0.9 keeps a
margin below the cliff of over-filling; ``lookahead`` one step (projecting an agent over as
many steps as it has lived restricted demo and paper-256 too hard: 267 s and 1163 s against
235 s and 915 s); ``busy_min`` 0.5 separates the tool-bound batches (in-engine share 0.28-0.31)
from the engine-bound ones (0.70-0.89); ``undo_cost_s`` 5 s is the least that kept a batch of
512 short agents open; ``reopen`` 0.5 is the middle of the range (0.3-0.6) that took
medium-wide from 140.2 to 128.8 s through the harness (0.7: 133.3 s, 0.8: 136.0 s; ``AdmitLaw``
lifts its restriction at ``undo_cost_s / 2`` for the same reason).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from concur_langgraph.checks import check_number
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.signals import Sample
from concur_langgraph.core.window import window_text
from concur_langgraph.errors import ConfigError

__all__ = ["FitLaw", "Lookahead", "agent_growth", "fit_window"]

Lookahead = Literal["step", "lindy"]
"""How far :func:`fit_window` projects each agent's growth (see there)."""


def agent_growth(agents: Sequence[AgentAccount]) -> float:
    """Tokens an agent's context grows by per step: the median over agents with two steps or
    more of ``(context - first_context) / (steps - 1)``; 0 before any agent took two."""
    rates = sorted((a.context - a.first_context) / (a.steps - 1) for a in agents if a.steps >= 2)
    if not rates:
        return 0.0
    mid = len(rates) // 2
    return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def fit_window(
    agents: Sequence[AgentAccount], budget_tokens: float, *, lookahead: Lookahead = "step"
) -> tuple[int, float] | None:
    """How many agents, in admission order, fit ``budget_tokens``, and the tokens they take;
    ``None`` before any agent's size is known.

    An agent's size is its context grown by the measured growth per step over the steps it is
    expected to still take: one (``"step"``: its next call), or as many as it has taken
    (``"lindy"``: an agent that lived s steps is expected to live about s more). An agent that
    never called is sized like the others' first context. The first agent always fits: a
    window is at least 1, even for an agent whose context outgrows the budget alone.
    """
    known = [a for a in agents if a.steps > 0]
    if not known:
        return None
    first = sum(a.first_context for a in known) / len(known)
    growth = agent_growth(agents)
    used, count = 0.0, 0
    for agent in agents:
        size = agent.context if agent.steps > 0 else first
        projected = size + growth * (max(1, agent.steps) if lookahead == "lindy" else 1)
        if count >= 1 and used + projected > budget_tokens:
            break
        used += projected
        count += 1
    return count, used


@dataclass(slots=True, kw_only=True)
class FitLaw(LawDefaults):
    """The window is the agents whose projected contexts fit the cache (module docstring)."""

    fill: float = 0.9
    """Share of the KV cache the admitted agents' projected contexts may fill."""
    high: float = 1.0
    """The window shrinks only when the fit at this share is smaller than it (>= ``fill``)."""
    lookahead: Lookahead = "step"
    """How far each agent's growth is projected (:func:`fit_window`)."""
    busy_min: float = 0.5
    """Below this in-engine share of the admitted agents, no restriction."""
    share_s: float = 20.0
    """Seconds the in-engine share is averaged over (an exponential moving average)."""
    undo_cost_s: float = 5.0
    """Restrict only when recomputing the contexts beyond the fit takes longer than this."""
    reopen: float = 0.5
    """A restriction is lifted by the cheap-to-undo guard only once recomputing the contexts
    beyond the fit takes at most ``reopen * undo_cost_s`` (hysteresis, as ``fill``/``high``)."""
    rate_window_s: float = 5.0
    """Seconds over which prefilled tokens (prompt tokens times the miss rate) are summed to
    measure the prefill rate (the largest such average so far)."""
    starts_open: bool = True
    """Start with every agent admitted: nothing is known of their sizes before they call."""
    _share: float | None = field(default=None, init=False)
    _rate: float = field(default=0.0, init=False)
    _prefill: deque[tuple[float, float]] = field(default_factory=deque, init=False, repr=False)
    _reason: str = field(default="FitLaw: no sample yet: open", init=False)
    _restricted: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_number("fill", self.fill, low=0, low_open=True)
        check_number("high", self.high, low=self.fill, low_name="fill")
        check_number("busy_min", self.busy_min, low=0, high=1)
        check_number("share_s", self.share_s, low=0, low_open=True)
        check_number("undo_cost_s", self.undo_cost_s, low=0)
        check_number("reopen", self.reopen, low=0, high=1)
        check_number("rate_window_s", self.rate_window_s, low=0, low_open=True)
        if self.lookahead not in ("step", "lindy"):
            raise ConfigError(f"lookahead: must be 'step' or 'lindy', got {self.lookahead!r}")

    @property
    def prefill_rate(self) -> float:
        """The server's prefill rate as measured so far, tokens per second (0: unknown)."""
        return self._rate

    @property
    def in_engine_share(self) -> float | None:
        """The averaged share of admitted agents with a call in flight (``None``: no sample)."""
        return self._share

    def explain(self, window: int, sample: Sample) -> str:
        """Why the last :meth:`next_window` returned what it did, with its numbers."""
        return self._reason

    def _observe(self, sample: Sample) -> None:
        dt = sample.interval_s or 0.0
        # The interval's prompt tokens times its miss rate. vLLM counts the lookups behind the
        # hit rate when a request is admitted and the prompt tokens when its prefill ends, so
        # this reads some cached tokens as prefilled (Sample.prompt_tokens_cached is exact).
        # undo_cost_s was set against this estimate, and the exact rate measured no better
        # (docs/laws.md): it stays until the constants are set against the exact one.
        hit = sample.prefix_hit_rate if sample.prefix_hit_rate is not None else 0.0
        computed = sample.prompt_tokens * (1.0 - hit)
        self._prefill.append((dt, computed))
        while len(self._prefill) > 1 and (
            sum(d for d, _ in self._prefill) - self._prefill[0][0] >= self.rate_window_s
        ):
            self._prefill.popleft()
        seconds = sum(d for d, _ in self._prefill)
        if seconds > 0:
            self._rate = max(self._rate, sum(t for _, t in self._prefill) / seconds)
        active = [a for a in sample.agents or () if a.state == "active"]
        if active:
            now = sum(a.in_call for a in active) / len(active)
            k = min(1.0, dt / self.share_s)
            self._share = now if self._share is None else self._share + k * (now - self._share)

    def next_window(self, window: int, sample: Sample) -> int:
        """One tick (see the module docstring)."""
        self._observe(sample)
        out = self._decide(window, sample)
        if sample.agents:
            # Restricted: the window leaves some agent out (what the reopen line applies to).
            self._restricted = out < len(sample.agents)
        return out

    def _decide(self, window: int, sample: Sample) -> int:
        agents = sample.agents
        capacity = sample.kv_capacity_tokens
        if not agents or capacity is None:
            self._reason = "FitLaw: no accounting of the agents or no KV capacity: hold"
            return window
        everyone = max(window, len(agents))
        fit = fit_window(agents, self.fill * capacity, lookahead=self.lookahead)
        if fit is None:
            self._reason = "FitLaw: no agent's size known yet: open"
            return everyone
        target, tokens = fit
        fits = (
            f"{target} of {len(agents)} agents fit {self.fill} of {capacity:,} KV tokens "
            f"({tokens:,.0f} tokens projected one step ahead)"
        )
        if target >= len(agents):
            self._reason = f"FitLaw: all {len(agents)} agents fit: open"
            return everyone
        share = self._share
        if share is not None and share < self.busy_min:
            self._reason = (
                f"FitLaw: {fits}, but only {share:.2f} of the admitted agents are in the engine "
                f"(< busy_min {self.busy_min}): tool-bound, open"
            )
            return everyone
        excess = self._excess_tokens(agents, target)
        cost = excess / self._rate if self._rate > 0 else None
        line, name = self.undo_cost_s, f"undo_cost_s {self.undo_cost_s}"
        if self._restricted:
            line, name = self.reopen * line, f"reopen x undo_cost_s {self.reopen * line:g}"
        if cost is None or cost <= line:
            why = (
                "prefill rate not measured yet"
                if cost is None
                else f"recomputing the {excess:,.0f} tokens beyond it takes {cost:.1f} s <= {name}"
            )
            self._reason = f"FitLaw: {fits}; {why}: open"
            return everyone
        over = f"recomputing the {excess:,.0f} tokens beyond it takes {cost:.1f} s"
        if target >= window:
            self._reason = f"FitLaw: {fits}; {over}: window {target}"
            return target
        high = fit_window(agents, self.high * capacity, lookahead=self.lookahead)
        assert high is not None
        if high[0] < window:
            self._reason = f"FitLaw: {fits}; {over}: shrink to {target}"
            return target
        self._reason = (
            f"FitLaw: {fits}, but {high[0]} fit {self.high} of the cache, at least the window "
            f"{window_text(window)}: hold"
        )
        return window

    @staticmethod
    def _excess_tokens(agents: Sequence[AgentAccount], target: int) -> float:
        """The projected tokens of the agents beyond the first ``target``."""
        known = [a for a in agents if a.steps > 0]
        first = sum(a.first_context for a in known) / len(known)
        growth = agent_growth(agents)
        return sum((a.context if a.steps > 0 else first) + growth for a in agents[target:])

"""The paper's law: CONCUR's congestion-based window (Chen et al., arXiv 2601.22705, Eq. 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from concur_langgraph.checks import check_count, check_number
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.signals import Sample
from concur_langgraph.errors import ConfigError

__all__ = ["ConcurLaw"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurLaw(LawDefaults):
    """CONCUR's congestion-based window law (Chen et al., arXiv 2601.22705, Eq. 1, sec. 4.3).

    With ``U`` the KV-cache usage and ``H`` the prefix-cache hit rate over the last interval,
    both taken as sampled (no smoothing)::

        W' = W + alpha          if U < u_low
        W' = floor(W * beta)    if U > u_high and H < h_thresh
        W' = W                  otherwise

    The defaults are the paper's constants, which it keeps fixed for every model, workload
    and engine: ``alpha = 2``, ``beta = 0.5``, ``U_low = 0.2``, ``U_high = 0.5``,
    ``H_thresh = 0.2``. The band between ``u_low`` and ``u_high`` is a deliberate dead band
    (admitting one long agent is a discrete jump in memory); the multiplicative decrease leaves
    a thrashing regime in O(log W) ticks. All comparisons are strict, as in the paper.

    The window counts agents, so the decrease is rounded down (``floor``): the law errs towards
    leaving congestion. It can reach 0; the controller clamps it to ``min_window`` (>= 1).
    """

    alpha: int = 2
    """Additive increase, in agents, when KV usage is below ``u_low``."""
    beta: float = 0.5
    """Multiplicative decrease factor (0 < beta < 1) when the cache thrashes."""
    u_low: float = 0.2
    """KV usage below which the window grows."""
    u_high: float = 0.5
    """KV usage above which the window may shrink (if the hit rate is also low)."""
    h_thresh: float = 0.2
    """Prefix hit rate below which high KV usage counts as thrashing."""
    no_queries: Literal["hold", "decrease"] = "hold"
    """What ``U > u_high`` does when the interval had no prefix-cache queries (the hit rate is
    undefined). ``"hold"`` (default): no new prefill means no evidence that prefixes are being
    evicted and recomputed, so the window is kept (the increase branch depends on ``U`` only and
    is unaffected). ``"decrease"``: an undefined hit rate counts as below ``h_thresh``."""

    def __post_init__(self) -> None:
        check_count("alpha", self.alpha, minimum=1)
        check_number("beta", self.beta, low=0, high=1, low_open=True, high_open=True)
        check_number("u_low", self.u_low, low=0, low_open=True)
        check_number("u_high", self.u_high, low=self.u_low, high=1, low_open=True, low_name="u_low")
        check_number("h_thresh", self.h_thresh, low=0, high=1)
        if self.no_queries not in ("hold", "decrease"):
            raise ConfigError(f"no_queries: must be 'hold' or 'decrease', got {self.no_queries!r}")

    def next_window(self, window: int, sample: Sample) -> int:
        """Apply Eq. 1 to one sample."""
        usage = sample.kv_usage
        if usage < self.u_low:
            return window + self.alpha
        if usage > self.u_high:
            hit_rate = sample.prefix_hit_rate
            thrashing = (
                self.no_queries == "decrease" if hit_rate is None else hit_rate < self.h_thresh
            )
            if thrashing:
                return math.floor(window * self.beta)
        return window

    def explain(self, window: int, sample: Sample) -> str:
        """Which branch of Eq. 1 this sample takes, with the numbers that chose it."""
        usage, hit = sample.kv_usage, sample.prefix_hit_rate
        kv = f"KV usage {usage:.2f}"
        if usage < self.u_low:
            return f"paper's law: {kv} < u_low {self.u_low}: grow by alpha {self.alpha}"
        if usage <= self.u_high:
            return (
                f"paper's law: {kv} in the dead band [u_low {self.u_low}, u_high "
                f"{self.u_high}]: hold"
            )
        if hit is None:
            verdict = "shrink" if self.no_queries == "decrease" else "hold"
            return (
                f"paper's law: {kv} > u_high {self.u_high}, no prefix-cache queries this "
                f"interval (no_queries={self.no_queries!r}): {verdict}"
            )
        if hit < self.h_thresh:
            return (
                f"paper's law: {kv} > u_high {self.u_high} and hit rate {hit:.2f} < h_thresh "
                f"{self.h_thresh} (thrashing): multiply by beta {self.beta}"
            )
        return (
            f"paper's law: {kv} > u_high {self.u_high} but hit rate {hit:.2f} >= h_thresh "
            f"{self.h_thresh} (prefixes still reused): hold"
        )

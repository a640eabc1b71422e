"""Control laws: a :class:`Sample` and the current window in, the next window out.

A law is a pure object: no I/O, no clock, no asyncio (Netflix concurrency-limits' ``Limit``
split). The controller owns time and enforcement, clamps the result to
``[min_window, max_window]``, and never calls a law on a stale sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

from ._errors import ConfigError
from ._signals import Sample

__all__ = ["ConcurLaw", "ControlLaw", "FixedLaw"]


@runtime_checkable
class ControlLaw(Protocol):
    """Decides the next window from the current one and the latest sample."""

    def next_window(self, window: int, sample: Sample) -> int:
        """The next window (the controller clamps it to ``[min_window, max_window]``).

        A law may also define ``explain(window, sample) -> str``: called right after
        ``next_window`` with the same arguments, it says why, in words (its phase, the signals
        and numbers that decided). The controller logs it with each window change and keeps it
        in ``statistics()``; a law without it is described by its result and the signals.
        """
        ...


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurLaw:
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
        if not _is_count(self.alpha) or self.alpha < 1:
            raise ConfigError(f"alpha: must be an integer >= 1 (agents added), got {self.alpha!r}")
        if not _is_real(self.beta) or not 0 < self.beta < 1:
            raise ConfigError(f"beta: must satisfy 0 < beta < 1, got {self.beta!r}")
        if not _is_real(self.u_low) or not 0 < self.u_low:
            raise ConfigError(f"u_low: must satisfy 0 < u_low < u_high, got {self.u_low!r}")
        if not _is_real(self.u_high) or not self.u_low < self.u_high <= 1:
            raise ConfigError(
                f"u_high: must satisfy u_low < u_high <= 1, got u_high={self.u_high!r} "
                f"with u_low={self.u_low!r}"
            )
        if not _is_real(self.h_thresh) or not 0 <= self.h_thresh <= 1:
            raise ConfigError(f"h_thresh: must satisfy 0 <= h_thresh <= 1, got {self.h_thresh!r}")
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


@dataclass(frozen=True, slots=True)
class FixedLaw:
    """A static window of ``k`` agents whatever the signals say (``max_concurrency``-style)."""

    k: int
    """The window, in agents (>= 1)."""

    follows_demand: ClassVar[bool] = False
    """The controller caps growth at the agents wanting a slot, except for a law like this one
    whose window is an explicit target rather than a probe."""

    def __post_init__(self) -> None:
        if not _is_count(self.k) or self.k < 1:
            raise ConfigError(f"k: a fixed window must be an integer >= 1, got {self.k!r}")

    def next_window(self, window: int, sample: Sample) -> int:
        """Always ``k``."""
        return self.k

    def explain(self, window: int, sample: Sample) -> str:
        """A fixed window says so."""
        return f"fixed window of {self.k} (FixedLaw)"

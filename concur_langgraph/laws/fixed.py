"""A static window: ``FixedLaw(k)``, the hand-set ``max_concurrency`` at agent level."""

from __future__ import annotations

from dataclasses import dataclass

from concur_langgraph.checks import check_count
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.signals import Sample

__all__ = ["FixedLaw"]


@dataclass(frozen=True, slots=True)
class FixedLaw(LawDefaults):
    """A static window of ``k`` agents whatever the signals say (``max_concurrency``-style)."""

    k: int
    """The window, in agents (>= 1)."""

    follows_demand = False
    """The controller caps growth at the agents wanting a slot, except for a law like this one
    whose window is an explicit target rather than a probe."""

    def __post_init__(self) -> None:
        check_count("k", self.k, minimum=1)

    def next_window(self, window: int, sample: Sample) -> int:
        """Always ``k``."""
        return self.k

    def explain(self, window: int, sample: Sample) -> str:
        """A fixed window says so."""
        return f"fixed window of {self.k} (FixedLaw)"

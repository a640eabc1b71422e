"""Peer systems' admission ideas, re-implemented as control laws for side-by-side benchmarks.

:class:`ThunderAgentLaw` follows ThunderAgent's published capacity model (arXiv 2602.13692; the
Dynamo port's ``thunderagent_router``; ../shared/notes/peers.md): the sum of every admitted
program's tokens, exact from each response's usage, with the prefix they share counted once,
against the KV capacity (``num_gpu_blocks x block_size``). Above ``pause`` (0.95) of the
capacity, programs are paused at their next tool boundary until the sum is at most ``low``
(0.80); paused and new programs are resumed only once the sum is ``resume_gap`` (0.10) below
the pause line, as many as fit under it. Its idea, not its code: ThunderAgent is a proxy that
pauses the *smallest* program first and resumes by best-fit-decreasing bin packing; through
our window (which parks the most recently admitted agents and serves parked agents first, in
order) the victims and the resume order are ours. Only the sizes and the bands are its.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from concur_langgraph.checks import check_number
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.core.signals import Sample

__all__ = ["ThunderAgentLaw"]


def _shared(agents: list[AgentAccount]) -> int:
    """The prefix every agent shares (the system prompt), estimated as the smallest first
    context: no agent's own tokens can be below it."""
    firsts = [a.first_context for a in agents if a.steps > 0]
    return min(firsts) if firsts else 0


def _count_under(agents: list[AgentAccount], budget: float, shared: int, first: float) -> int:
    """How many agents, in admission order, keep the sum (shared prefix once) under budget."""
    total, count = float(shared), 0
    for agent in agents:
        size = (agent.context if agent.steps > 0 else first) - shared
        if count >= 1 and total + size > budget:
            break
        total += max(0.0, size)
        count += 1
    return count


@dataclass(slots=True, kw_only=True)
class ThunderAgentLaw(LawDefaults):
    """ThunderAgent's pause / resume bands over the exact token sum (module docstring)."""

    pause: float = 0.95
    """Pause above this share of the KV capacity."""
    low: float = 0.80
    """Pause down to this share."""
    resume_gap: float = 0.10
    """Resume only this far below the pause line."""
    starts_open: bool = True
    """A proxy admits programs as they come: every agent at the start."""
    follows_demand = False
    _paused: bool = field(default=False, init=False)
    _reason: str = field(default="ThunderAgent: no sample yet", init=False)

    def __post_init__(self) -> None:
        check_number("pause", self.pause, low=0, high=1, low_open=True)
        check_number("low", self.low, low=0, high=self.pause, low_open=True)
        check_number("resume_gap", self.resume_gap, low=0, high=self.pause)

    def next_window(self, window: int, sample: Sample) -> int:
        capacity = sample.kv_capacity_tokens
        if not sample.agents or capacity is None:
            self._reason = "ThunderAgent: no accounting or capacity: hold"
            return window
        agents = list(sample.agents)
        known = [a for a in agents if a.steps > 0]
        if not known:
            self._reason = "ThunderAgent: no program's size known yet: hold"
            return window
        shared = _shared(agents)
        first = sum(a.first_context for a in known) / len(known)
        active = [a for a in agents if a.state == "active"]
        used = shared + sum(max(0, a.context - shared) for a in active)
        share = used / capacity
        if share > self.pause:
            target = _count_under(agents, self.low * capacity, shared, first)
            self._reason = (
                f"ThunderAgent: {used:,} tokens = {share:.2f} of capacity > pause {self.pause}: "
                f"pause down to {self.low} ({target} agents)"
            )
            return min(window, target)
        if share < self.pause - self.resume_gap and len(agents) > len(active):
            target = _count_under(agents, self.pause * capacity, shared, first)
            self._reason = (
                f"ThunderAgent: {used:,} tokens = {share:.2f} of capacity < "
                f"{self.pause - self.resume_gap:.2f}: resume up to the pause line ({target} agents)"
            )
            return max(window, target)
        self._reason = f"ThunderAgent: {used:,} tokens = {share:.2f} of capacity: hold"
        return window

    def explain(self, window: int, sample: Sample) -> str:
        return self._reason

"""What a session reports: :class:`SessionStatistics`, a frozen snapshot, readable printed."""

from __future__ import annotations

from dataclasses import dataclass

from concur_langgraph.core.controller import ControllerStatistics
from concur_langgraph.core.gate import GateStatistics
from concur_langgraph.core.window import window_text

__all__ = ["SessionStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatistics:
    """A snapshot of one session."""

    gate: GateStatistics
    """The gate and its window: limit, holders, active, parked, waiting, completed. With a
    shared window, the shared limit and holders as this process last saw them."""
    controller: ControllerStatistics | None
    """The controller (last sample, staleness, ticks; its final state once the session is
    closed, or once this process stopped leading), or ``None`` when there are no signals, the
    session was never entered, or this process has not led a distributed batch."""
    leader: bool | None = None
    """Whether this process drives the shared window now (it runs the controller); ``None``
    when there is nothing to lead (an in-process window, or no signals)."""

    def __str__(self) -> str:
        """The snapshot for people, one aspect per line (``print(gate.statistics())``)."""
        gate, window = self.gate, self.gate.window
        lines = [
            f"window      {window_text(window.limit)} ({window.holders} holding a slot, "
            f"{window.waiting_parked} parked and {window.waiting_new} new agents waiting)",
            f"agents      {gate.active} active, {gate.parked} parked, {gate.waiting} waiting, "
            f"{gate.completed} done; {gate.llm_calls:,} LLM calls, {gate.parks_total:,} parks",
        ]
        controller = self.controller
        if controller is None:
            lines.append("controller  none (a fixed window without signals, or not the leader)")
            return "\n".join(lines)
        sample = controller.last_sample
        if sample is not None:
            hit = sample.prefix_hit_rate
            age = f", {controller.staleness_s:.0f} s stale" if controller.stale else ""
            lines.append(
                f"server      KV usage {sample.kv_usage:.2f}, prefix hit rate "
                f"{'-' if hit is None else f'{hit:.2f}'}, {sample.running} running, "
                f"{sample.waiting} waiting ({sample.waiting_capacity} for KV), "
                f"{sample.preemptions} preemptions in the last interval{age}"
            )
        decision = controller.last_decision
        if decision is not None:
            lines.append(f"decision    {decision}")
        lines.append(
            f"controller  {controller.ticks} ticks, {controller.changes} window changes, "
            f"{controller.errors} metrics errors"
            + ("" if self.leader is None else f"; {'leader' if self.leader else 'follower'}")
        )
        return "\n".join(lines)

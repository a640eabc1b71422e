"""What a session reports: :class:`SessionStatistics`, a frozen snapshot, readable printed."""

from __future__ import annotations

from dataclasses import dataclass

from concur_langgraph.core.controller import ControllerStatistics
from concur_langgraph.core.gate import GateStatistics
from concur_langgraph.core.window import window_text

__all__ = ["ReplicaSnapshot", "SessionStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSnapshot:
    """One replica of a batch on several (``vllm_url=[...]`` without a router)."""

    index: int
    """Its place in the list of URLs."""
    url: str
    """Its base URL."""
    alive: bool
    """False once it was marked dead: it takes no agents for the rest of the batch."""
    placed_total: int
    """Agents placed on it since the batch began (re-placements from a dead replica too)."""
    gate: GateStatistics
    """Its own gate and window: the agents placed on it."""
    controller: ControllerStatistics | None
    """Its own controller (its signals, its law's last decision), or ``None`` without
    signals (or, on Redis, when another worker leads this replica's window)."""
    leader: bool | None = None
    """On Redis: whether this process drives this replica's window; else ``None``."""

    def __str__(self) -> str:
        gate, window = self.gate, self.gate.window
        state = "" if self.alive else " DEAD"
        line = (
            f"replica {self.index} {self.url}{state}: window {window_text(window.limit)}, "
            f"{gate.active} active, {gate.parked} parked, {gate.waiting} waiting, "
            f"{gate.completed} done, {self.placed_total} placed"
        )
        controller = self.controller
        sample = controller.last_sample if controller is not None else None
        if sample is not None:
            hit = sample.prefix_hit_rate
            line += (
                f"; KV usage {sample.kv_usage:.2f}, hit rate "
                f"{'-' if hit is None else f'{hit:.2f}'}, {sample.preemptions} preemptions"
            )
        return line


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
    replicas: tuple[ReplicaSnapshot, ...] = ()
    """With several replicas: each one's own window, agents and controller (``gate`` is then
    their sum and ``controller`` is ``None``); empty on one server."""

    def __str__(self) -> str:
        """The snapshot for people, one aspect per line (``print(gate.statistics())``)."""
        gate, window = self.gate, self.gate.window
        lines = [
            f"window      {window_text(window.limit)} ({window.holders} holding a slot, "
            f"{window.waiting_parked} parked and {window.waiting_new} new agents waiting)",
            f"agents      {gate.active} active, {gate.parked} parked, {gate.waiting} waiting, "
            f"{gate.completed} done; {gate.llm_calls:,} LLM calls, {gate.parks_total:,} parks",
        ]
        if self.replicas:
            lines.extend(str(replica) for replica in self.replicas)
            return "\n".join(lines)
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

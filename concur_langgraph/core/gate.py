"""The gate: what every LLM call of an agent passes through.

Before each LLM call (a generation-step boundary) the integration calls
:meth:`Gate.before_llm_call` with the agent's identity:

* the agent holds a slot and the window is not over-committed: return at once. This is the fast
  path; it awaits nothing, so it never yields to the event loop (a dict lookup and a length
  comparison; ``benchmarks/gate_overhead.py`` measures it);
* the agent has no slot yet: wait for one (FIFO);
* holders exceed the window and this agent is a victim (most recently admitted first): give the
  slot back and park right here, before the call is sent, then resume with priority over agents
  that never started. The agent's state is untouched: it is simply awaiting.

A call already sent is never interrupted. When the agent's run ends (success, error, interrupt or
cancellation) the integration calls :meth:`Gate.release`, which is idempotent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from concur_langgraph.checks import check_number
from concur_langgraph.core.window import AdmissionWindow, Permit, WindowStatistics
from concur_langgraph.errors import AdmissionTimeoutError, ConcurError

__all__ = ["Gate", "GateStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GateStatistics:
    """A snapshot of the gate and its window."""

    window: WindowStatistics
    """The window backend's own view (limit, holders, waiters)."""
    active: int
    """Agents of this gate holding a slot."""
    parked: int
    """Agents of this gate that gave their slot back and wait to resume."""
    waiting: int
    """Agents of this gate waiting for their first slot."""
    completed: int
    """Agents whose run ended (any outcome) and whose slot was released."""
    llm_calls: int
    """LLM calls that reached the gate (counted on arrival, before any wait for a slot)."""
    parks_total: int
    """How many times an agent parked (one agent can park several times)."""


class _Agent:
    __slots__ = ("busy", "parked", "permit")

    def __init__(self) -> None:
        self.permit: Permit | None = None
        # Set while one call of this agent is acquiring; a sibling call (parallel tool/LLM
        # calls of one agent) waits for it instead of taking a second slot.
        self.busy: asyncio.Event | None = None
        self.parked = False


class Gate:
    """Per-agent admission on top of an :class:`AdmissionWindow`.

    Args:
        window: the slot backend (in-process or distributed).
        max_rps: optional cap on LLM calls per second across the gate (aiolimiter leaky
            bucket), for servers behind a rate-limited gateway. Applied after admission, so
            both limits hold and a parked agent is not overtaken by the rate limiter.
        admission_timeout_s: optional bound on one wait for a slot; past it the call raises
            :class:`AdmissionTimeoutError` (the agent's run fails and its slot accounting is
            clean). ``None`` waits as long as it takes: the window never drops below 1, so
            every waiter is eventually served.
    """

    def __init__(
        self,
        window: AdmissionWindow,
        *,
        max_rps: float | None = None,
        admission_timeout_s: float | None = None,
    ) -> None:
        max_rps = check_number("max_rps", max_rps, low=0, low_open=True, optional=True)
        admission_timeout_s = check_number(
            "admission_timeout_s", admission_timeout_s, low=0, low_open=True, optional=True
        )
        self.window = window
        self._admission_timeout_s = admission_timeout_s
        self._limiter = None
        if max_rps is not None:
            from aiolimiter import AsyncLimiter

            # One token per call; capacity max_rps over a 1 s period allows no burst beyond
            # one second's worth of calls.
            self._limiter = AsyncLimiter(max_rps, 1.0)
        self._agents: dict[str, _Agent] = {}
        self._completed = 0
        self._llm_calls = 0
        self._parks_total = 0

    def holds(self, agent_id: str) -> bool:
        """Whether the agent holds a slot now."""
        agent = self._agents.get(agent_id)
        return agent is not None and agent.permit is not None and not agent.permit.released

    async def before_llm_call(self, agent_id: str, *, llm_call: bool = True) -> None:
        """Wait until ``agent_id`` may send its next LLM call (see the module docstring).

        ``llm_call=False`` admits without a call of its own (the gate node, which the LLM call
        after it passes on the fast path): it counts in neither ``llm_calls`` nor ``max_rps``.
        """
        if llm_call:
            self._llm_calls += 1
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent()
        while True:
            permit = agent.permit
            if permit is not None and not permit.released:
                if not self.window.must_park(permit):
                    break  # the fast path: nothing awaited
                agent.permit = None
                await self.window.release(permit)
                self._parks_total += 1
                agent.parked = True
            elif agent.busy is not None:
                await agent.busy.wait()
                continue
            elif permit is not None:
                # Released under us (a distributed lease that expired): come back as parked.
                agent.permit = None
                agent.parked = True
            await self._acquire(agent_id, agent)
        if self._limiter is not None and llm_call:
            await self._limiter.acquire()

    async def _acquire(self, agent_id: str, agent: _Agent) -> None:
        busy = agent.busy = asyncio.Event()
        try:
            if self._admission_timeout_s is None:
                agent.permit = await self.window.acquire(agent_id, parked=agent.parked)
            else:
                try:
                    async with asyncio.timeout(self._admission_timeout_s):
                        agent.permit = await self.window.acquire(agent_id, parked=agent.parked)
                except TimeoutError as exc:
                    raise AdmissionTimeoutError(
                        f"agent {agent_id!r} waited more than admission_timeout_s="
                        f"{self._admission_timeout_s} for a slot "
                        f"(window {self.window.limit}, {self.window.statistics().holders} holders)"
                    ) from exc
            agent.parked = False
            if self._agents.get(agent_id) is not agent:
                # The run ended (release() was called) while this call waited: the slot must
                # not outlive its agent.
                permit, agent.permit = agent.permit, None
                if permit is not None:
                    await self.window.release(permit)
                raise ConcurError(
                    f"agent {agent_id!r} was released while one of its LLM calls waited for "
                    "admission; that call is not sent"
                )
        finally:
            agent.busy = None
            busy.set()

    async def release(self, agent_id: str) -> None:
        """The agent's run ended: give its slot back. Idempotent; unknown agents are ignored."""
        agent = self._agents.pop(agent_id, None)
        if agent is None:
            return
        self._completed += 1
        permit = agent.permit
        if permit is not None:
            agent.permit = None
            await self.window.release(permit)

    def statistics(self) -> GateStatistics:
        """A snapshot of the gate and its window."""
        active = parked = waiting = 0
        for agent in self._agents.values():
            if agent.permit is not None and not agent.permit.released:
                active += 1
            elif agent.busy is not None:
                if agent.parked:
                    parked += 1
                else:
                    waiting += 1
        return GateStatistics(
            window=self.window.statistics(),
            active=active,
            parked=parked,
            waiting=waiting,
            completed=self._completed,
            llm_calls=self._llm_calls,
            parks_total=self._parks_total,
        )

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

Accounting. The gate also keeps what it sees of each agent, exactly and with no I/O: after each
call the integration reports the response's usage (:meth:`Gate.after_llm_call`), so the gate
knows each agent's context (the last call's prompt plus completion tokens: what the agent's
prefix occupies in the KV cache, whether it is in a call or waiting on a tool), the tokens it
generated, its steps, and whether a call of it is in flight. vLLM's own KV usage counts only
running requests; this counts the agents in tool calls too, whose prefixes are the ones that
get evicted (:meth:`Gate.accounting`).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

from concur_langgraph.checks import check_number
from concur_langgraph.core.window import AdmissionWindow, Permit, WindowStatistics
from concur_langgraph.errors import AdmissionTimeoutError, ConcurError

__all__ = ["AgentAccount", "Gate", "GateStatistics", "find_gate"]

# Every live Gate of this process, for the HTTP transport that tags requests (it is built
# before the gate, as the model is, and finds an agent's gate by asking which gate knows it).
_LIVE: weakref.WeakSet[Gate] = weakref.WeakSet()


def find_gate(agent_id: str) -> Gate | None:
    """The live :class:`Gate` that knows ``agent_id`` (it passed it at least once), or
    ``None``."""
    for gate in list(_LIVE):
        if agent_id in gate._agents:
            return gate
    return None


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
    in_call: int = 0
    """Agents holding a slot with an LLM call in flight (the others are in a tool or between
    steps: their prefixes sit in the engine's cache unused)."""
    tokens_active: int = 0
    """Sum of the contexts (tokens) of the agents holding a slot: their working set."""
    tokens_parked: int = 0
    """Sum of the contexts of the parked agents (what resuming them will need)."""
    tokens_generated: int = 0
    """Completion tokens of every call of this gate so far."""
    usage_missing: int = 0
    """Calls that ended without usage (a client that does not ask for it): their agents'
    contexts are not known exactly."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentAccount:
    """What the gate knows of one agent."""

    agent_id: str
    """The agent (its thread id)."""
    state: str
    """``active`` (holds a slot), ``parked`` or ``waiting`` (for its first slot)."""
    context: int
    """Its last call's prompt plus completion tokens (0 before its first call ended)."""
    generated: int
    """Completion tokens over its calls."""
    steps: int
    """Calls that ended with usage."""
    first_context: int
    """Its context after its first call (its task's prompt and first answer): what it grows
    from, so ``(context - first_context) / (steps - 1)`` is its growth per step."""
    in_call: bool
    """Whether a call of it is in flight."""
    order: int
    """Its place in the admission order: for an active agent, when it was admitted; for a
    waiting one, when it came (parked agents resume before new ones)."""


class _Agent:
    __slots__ = (
        "busy",
        "calls",
        "context",
        "first_context",
        "generated",
        "order",
        "parked",
        "permit",
        "steps",
    )

    def __init__(self, order: int) -> None:
        self.permit: Permit | None = None
        # Set while one call of this agent is acquiring; a sibling call (parallel tool/LLM
        # calls of one agent) waits for it instead of taking a second slot.
        self.busy: asyncio.Event | None = None
        self.parked = False
        self.calls = 0
        self.context = 0
        self.first_context = 0
        self.generated = 0
        self.steps = 0
        self.order = order


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
        priority_hint: tag each agent's requests with its admission rank as the engine's
            request priority (:meth:`priority_of`; sent by the routing transport).
    """

    def __init__(
        self,
        window: AdmissionWindow,
        *,
        max_rps: float | None = None,
        admission_timeout_s: float | None = None,
        priority_hint: bool = False,
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
        self._arrivals = 0
        self._tokens_generated = 0
        self._usage_missing = 0
        self.priority_hint = priority_hint
        _LIVE.add(self)

    def holds(self, agent_id: str) -> bool:
        """Whether the agent holds a slot now."""
        agent = self._agents.get(agent_id)
        return agent is not None and agent.permit is not None and not agent.permit.released

    def passes(self, agent_id: str) -> bool:
        """Whether the agent's next call would pass at once (it holds a slot it need not give
        back): the fast path, checked without taking it."""
        agent = self._agents.get(agent_id)
        permit = agent.permit if agent is not None else None
        return permit is not None and not permit.released and not self.window.must_park(permit)

    def priority_of(self, agent_id: str) -> int | None:
        """The engine priority of the agent's next request when ``priority_hint`` is on: its
        slot's place in the admission order (lower = admitted earlier = served first and
        preempted last by a vLLM started with ``--scheduling-policy priority``, the same
        agents the window would park last); ``None`` when the hint is off or the agent holds
        no slot."""
        if not self.priority_hint:
            return None
        agent = self._agents.get(agent_id)
        permit = agent.permit if agent is not None else None
        return None if permit is None or permit.released else permit.seq

    async def before_llm_call(self, agent_id: str, *, llm_call: bool = True) -> None:
        """Wait until ``agent_id`` may send its next LLM call (see the module docstring).

        ``llm_call=False`` admits without a call of its own (the gate node, which the LLM call
        after it passes on the fast path): it counts in neither ``llm_calls`` nor ``max_rps``.
        """
        if llm_call:
            self._llm_calls += 1
        agent = self._agents.get(agent_id)
        if agent is None:
            self._arrivals += 1
            agent = self._agents[agent_id] = _Agent(self._arrivals)
        while True:
            permit = agent.permit
            if permit is not None and not permit.released:
                if not self.window.must_park(permit):
                    break  # the fast path: nothing awaited
                agent.permit = None
                await self.window.release(permit)
                self._parks_total += 1
                agent.parked = True
                self._arrivals += 1
                agent.order = self._arrivals
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
        if llm_call:
            agent.calls += 1

    def after_llm_call(
        self, agent_id: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """A call of ``agent_id`` ended; its usage (``None`` when the response had none, or
        the call failed). Synchronous and O(1): no I/O."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return
        agent.calls = max(0, agent.calls - 1)
        if prompt_tokens is None or completion_tokens is None:
            self._usage_missing += 1
            return
        agent.context = prompt_tokens + completion_tokens
        if agent.steps == 0:
            agent.first_context = agent.context
        agent.generated += completion_tokens
        agent.steps += 1
        self._tokens_generated += completion_tokens

    def waiting_to_resume(self) -> list[str]:
        """The parked agents waiting for a slot now, in the order they came back (the order
        the window serves them). O(agents)."""
        waiting = [
            (agent.order, agent_id)
            for agent_id, agent in self._agents.items()
            if agent.parked and agent.busy is not None and agent.permit is None
        ]
        return [agent_id for _, agent_id in sorted(waiting)]

    def accounting(self) -> list[AgentAccount]:
        """Every agent the gate knows now, in admission order: the agents holding a slot (in
        the order they were admitted), then the parked ones and the new ones waiting, in the
        order they will be served (parked first). O(agents); meant for the controller's tick,
        not the fast path."""
        active: list[tuple[int, AgentAccount]] = []
        parked: list[tuple[int, AgentAccount]] = []
        waiting: list[tuple[int, AgentAccount]] = []
        for agent_id, agent in self._agents.items():
            permit = agent.permit
            if permit is not None and not permit.released:
                state, key, into = "active", permit.seq, active
            elif agent.parked:
                state, key, into = "parked", agent.order, parked
            else:
                state, key, into = "waiting", agent.order, waiting
            into.append(
                (
                    key,
                    AgentAccount(
                        agent_id=agent_id,
                        state=state,
                        context=agent.context,
                        generated=agent.generated,
                        steps=agent.steps,
                        first_context=agent.first_context,
                        in_call=agent.calls > 0,
                        order=key,
                    ),
                )
            )
        return [a for group in (active, parked, waiting) for _, a in sorted(group, key=_first)]

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

    async def forget(self, agent_id: str) -> AgentAccount | None:
        """Take the agent out of this gate without ending its run (it moves to another
        replica's gate, :class:`~concur_langgraph.core.replicas.ReplicaGate`): its slot is given
        back, it does not count as completed; returns what the gate knew of it (``None`` for an
        unknown agent)."""
        agent = self._agents.pop(agent_id, None)
        if agent is None:
            return None
        account = AgentAccount(
            agent_id=agent_id,
            state="parked",
            context=agent.context,
            generated=agent.generated,
            steps=agent.steps,
            first_context=agent.first_context,
            in_call=False,
            order=agent.order,
        )
        permit, agent.permit = agent.permit, None
        if permit is not None:
            await self.window.release(permit)
        return account

    def adopt(self, agent_id: str, account: AgentAccount | None) -> None:
        """Take in an agent that ran elsewhere (see :meth:`forget`): its next call waits for a
        slot as a parked agent does (ahead of new agents), and its account carries over.
        Does nothing for an agent this gate knows already."""
        if agent_id in self._agents:
            return
        self._arrivals += 1
        agent = self._agents[agent_id] = _Agent(self._arrivals)
        agent.parked = True
        if account is not None:
            agent.context = account.context
            agent.first_context = account.first_context
            agent.generated = account.generated
            agent.steps = account.steps

    def statistics(self) -> GateStatistics:
        """A snapshot of the gate and its window."""
        active = parked = waiting = in_call = tokens_active = tokens_parked = 0
        for agent in self._agents.values():
            if agent.permit is not None and not agent.permit.released:
                active += 1
                tokens_active += agent.context
                in_call += agent.calls > 0
            elif agent.busy is not None:
                if agent.parked:
                    parked += 1
                    tokens_parked += agent.context
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
            in_call=in_call,
            tokens_active=tokens_active,
            tokens_parked=tokens_parked,
            tokens_generated=self._tokens_generated,
            usage_missing=self._usage_missing,
        )


def _first(pair: tuple[int, AgentAccount]) -> int:
    return pair[0]

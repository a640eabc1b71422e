"""Several data-parallel replicas: one window per replica, each agent sticky to one.

An agent's prefix lives in the KV cache of the replica that served it, and each replica has
its own KV pressure. So with several replicas the batch gets one :class:`Gate` (and one window,
driven by that replica's own law and signals) per replica, and a :class:`ReplicaGate` in front
of them that places each agent on a replica and sends all its calls there:

* **Placement when first admitted.** A new agent waits in one FIFO shared by every replica (the
  ``placing`` queue) until some replica has room: a free slot under its window and nobody of its
  own waiting (its parked agents resume first). It then goes to the replica with the most free
  slots (ties: the fewest agents placed there, then the lowest index) and is admitted there at
  once. Placing at admission, not at arrival, means a replica whose law shrinks its window does
  not collect a queue while another has room: the free slot of a replica is the law's own
  verdict on its pressure, so "most free slots" is pressure-aware without a model of its own.
* **Sticky after.** Every later call of the agent, parked or not, goes to the same replica (its
  prefix is there); a parked agent resumes on its replica, ahead of new agents, as on one
  server, with one exception: when nobody waits to be placed and a replica has room and nobody
  of its own waiting while another has parked agents waiting, the first of those moves there
  (once per agent; :meth:`ReplicaGate._steal` says why it pays).
* **A replica that dies** (:meth:`ReplicaGate.mark_dead`, called by the routing transport on a
  refused connection, or by the user) stops taking agents. Its agents are re-placed: those
  waiting in its window are woken at once, the others at their next call; each goes back to the
  front of the ``placing`` queue (it has sunk work, like a parked agent) and is placed on a live
  replica, where its next call re-prefills its context. A call in flight on the dead replica
  fails in the client; the client's retry (the OpenAI SDK retries connection errors twice by
  default) goes through the routing transport, which sends it to the agent's new replica at
  once, before the gate has admitted it there: for that one call the new replica carries one
  agent over its window. If every replica is dead, calls fail with :class:`ReplicaError`.

The calls themselves are routed by an HTTP transport that asks :meth:`ReplicaGate.route` where
the calling agent lives (``integrations/transport.py``); behind a router that places calls
itself, use one window over the folded signals instead (``docs/distributed.md``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from concur_langgraph.core.gate import AgentAccount, Gate, GateStatistics
from concur_langgraph.core.window import OPEN, AdmissionWindow, WindowStatistics
from concur_langgraph.errors import ConcurError, ConfigError

__all__ = [
    "CALLING_AGENT",
    "ReplicaError",
    "ReplicaGate",
    "ReplicaStatistics",
    "find_replica_gate",
]

CALLING_AGENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "concur_calling_agent", default=None
)
"""The agent whose model call runs in this context, where a way in knows it better than the
run's thread id (the middleware, for a run without one); the routing transport reads it first."""

logger = logging.getLogger("concur_langgraph")


class ReplicaError(ConcurError):
    """No replica can serve the call: every replica of the batch is dead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaStatistics:
    """One replica's part of the batch."""

    index: int
    """Its place in the list of URLs."""
    url: str
    """Its base URL."""
    alive: bool
    """False once it was marked dead (it takes no agents for the rest of the batch)."""
    gate: GateStatistics
    """Its gate and window (the agents placed on it)."""
    placed_total: int
    """Agents placed on it since the batch began (first placements and re-placements)."""


# Every live ReplicaGate of this process, for the routing transport, which is built before any
# gate (the model goes into the graph before the graph goes into ConcurGate) and so finds the
# gate of a calling agent by asking which gate placed it.
_LIVE: weakref.WeakSet[ReplicaGate] = weakref.WeakSet()


def find_replica_gate(agent_id: str) -> ReplicaGate | None:
    """The live :class:`ReplicaGate` that placed ``agent_id``, or ``None``."""
    for gate in list(_LIVE):
        if agent_id in gate._placement:
            return gate
    return None


class PlacementStore(Protocol):
    """Where placements are shared between worker processes (``distributed/placements.py``):
    an agent resumed by another worker (after a crash) goes back to its replica."""

    async def get(self, agent_id: str) -> int | None:
        """The agent's stored replica, or ``None``."""
        ...

    async def put(self, agent_id: str, index: int) -> None:
        """Store the agent's replica."""
        ...

    async def forget(self, agent_id: str) -> None:
        """The agent's run ended: drop its placement."""
        ...


class _Waiter:
    __slots__ = ("agent_id", "future")

    def __init__(self, agent_id: str, future: asyncio.Future[int]) -> None:
        self.agent_id = agent_id
        self.future = future


class ReplicaGate:
    """Per-replica gates behind one gate interface (see the module docstring).

    Args:
        urls: the replicas' base URLs, in order (the routing transport sends an agent's calls
            to its replica's URL).
        gates: one :class:`Gate` per replica, on that replica's window.

    Has the methods of :class:`Gate` that the ways in use (``before_llm_call``,
    ``after_llm_call``, ``release``, ``holds``, ``accounting``, ``statistics``) plus
    :meth:`route`, :meth:`replica_of`, :meth:`mark_dead` and :meth:`replica_statistics`.
    """

    def __init__(self, urls: Sequence[str], gates: Sequence[Gate]) -> None:
        if len(urls) != len(gates) or not urls:
            raise ConfigError(
                f"replicas: one gate per URL is needed, got {len(urls)} URLs, {len(gates)} gates"
            )
        self.urls = tuple(urls)
        self.gates = tuple(gates)
        self._alive = [True] * len(gates)
        self.window = _Windows([g.window for g in gates], self._alive)
        """The replicas' windows seen as one (limits and counts summed), for displays."""
        self._placement: dict[str, int] = {}
        # Agents that lost their replica (it died) and must be placed again on their next call.
        self._moved: set[str] = set()
        # What the gate of a dead replica knew of each moved agent, for its new replica's gate.
        self._carry: dict[str, AgentAccount | None] = {}
        self._placing_moved: deque[_Waiter] = deque()
        self._placing_new: deque[_Waiter] = deque()
        # The task of each agent inside its replica's gate (to move a parked one, see _steal),
        # the parked agents being moved (agent -> new replica), and those moved once already.
        self._tasks: dict[str, asyncio.Task[object]] = {}
        self._moving: dict[str, int] = {}
        self._moved_once: set[str] = set()
        self.moves_total = 0
        """Parked agents moved to a replica with room (see :meth:`_steal`)."""
        # Placed by _dispatch but not yet admitted by their replica's window (their task has not
        # run yet): counted against the replica's room so one pass does not over-place.
        self._pending = [0] * len(gates)
        self._placed = [0] * len(gates)
        self._placed_total = [0] * len(gates)
        self._routed_calls = 0
        self._warned_unrouted = False
        self.store: PlacementStore | None = None
        """Shared placements (several worker processes on Redis), or ``None``."""
        self.on_dead: Callable[[int], Awaitable[object]] | None = None
        """Called (awaited) with a replica's index when it is marked dead (the session stops
        that replica's controller)."""
        _LIVE.add(self)

    # -- the gate interface --------------------------------------------------------------------

    def holds(self, agent_id: str) -> bool:
        """Whether the agent holds a slot on its replica now."""
        index = self._placement.get(agent_id)
        return index is not None and self.gates[index].holds(agent_id)

    async def before_llm_call(self, agent_id: str, *, llm_call: bool = True) -> None:
        """Place the agent if it has no replica yet, then pass its replica's gate."""
        index = self._placement.get(agent_id)
        if index is not None and self._alive[index] and self.gates[index].passes(agent_id):
            # The fast path: it holds a slot on its replica and keeps it.
            await self.gates[index].before_llm_call(agent_id, llm_call=llm_call)
            return
        while True:
            index = self._placement.get(agent_id)
            if index is not None and not self._alive[index]:
                await self._leave(agent_id, index)
                index = None
            if index is None:
                index = await self._place(agent_id)
            gate = self.gates[index]
            if agent_id in self._carry:
                # Moved here (its replica died, or it was moved while parked): it resumes here
                # as a parked agent would, with what the gate knew of it.
                gate.adopt(agent_id, self._carry.pop(agent_id))
            task = asyncio.current_task()
            if task is not None:
                self._tasks[agent_id] = task
            try:
                await gate.before_llm_call(agent_id, llm_call=llm_call)
            except asyncio.CancelledError:
                to = self._moving.pop(agent_id, None)
                if to is None or task is None:
                    raise
                # Moved while it waited to resume (see _steal): not a cancellation of the run,
                # unless someone else cancelled it too.
                if task.uncancel() > 0:
                    self._pending[to] -= 1
                    raise
                await self._move_parked(agent_id, index, to)
                llm_call = False
                continue
            finally:
                self._tasks.pop(agent_id, None)
            if self._alive[index] and self._placement.get(agent_id) == index:
                return
            # Its replica died while it waited there: place it again.
            llm_call = False  # counted once, on the first pass

    def after_llm_call(
        self, agent_id: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """A call of the agent ended (see :meth:`Gate.after_llm_call`)."""
        index = self._placement.get(agent_id)
        if index is not None:
            self.gates[index].after_llm_call(agent_id, prompt_tokens, completion_tokens)
        if self._routed_calls == 0 and not self._warned_unrouted:
            # A call ended without passing the routing transport: the client sends it wherever
            # its base_url says, whatever the placement.
            self._warned_unrouted = True
            logger.warning(
                "concur: a batch on %d replicas, but agent %r's call did not go through the "
                "routing transport, so calls are not sent to the agents' replicas: build the "
                "model with http_async_client=concur_langgraph.routed_http_client(), or pass "
                "router=True when a router places the calls",
                len(self.urls),
                agent_id,
            )

    async def release(self, agent_id: str) -> None:
        """The agent's run ended: give its slot back on its replica. Idempotent."""
        self._moved.discard(agent_id)
        self._carry.pop(agent_id, None)
        index = self._placement.pop(agent_id, None)
        if index is None:
            return
        self._placed[index] -= 1
        await self.gates[index].release(agent_id)
        self._dispatch()
        if self.store is not None:
            await self.store.forget(agent_id)

    def accounting(self) -> list[AgentAccount]:
        """Every agent of every replica (see :meth:`Gate.accounting`), replica by replica."""
        return [a for gate in self.gates for a in gate.accounting()]

    def statistics(self) -> GateStatistics:
        """The replicas' gates summed (windows included): the batch as one gate."""
        parts = [gate.statistics() for gate in self.gates]
        waiting_placement = sum(
            1 for w in (*self._placing_moved, *self._placing_new) if not w.future.done()
        )
        return GateStatistics(
            window=self.window.statistics(),
            active=sum(p.active for p in parts),
            parked=sum(p.parked for p in parts),
            waiting=sum(p.waiting for p in parts) + waiting_placement,
            completed=sum(p.completed for p in parts),
            llm_calls=sum(p.llm_calls for p in parts),
            parks_total=sum(p.parks_total for p in parts),
            in_call=sum(p.in_call for p in parts),
            tokens_active=sum(p.tokens_active for p in parts),
            tokens_parked=sum(p.tokens_parked for p in parts),
            tokens_generated=sum(p.tokens_generated for p in parts),
            usage_missing=sum(p.usage_missing for p in parts),
        )

    # -- replicas ------------------------------------------------------------------------------

    def replica_of(self, agent_id: str) -> int | None:
        """The index of the agent's replica, or ``None`` (not placed, or its replica died)."""
        index = self._placement.get(agent_id)
        return index if index is not None and self._alive[index] else None

    async def route(self, agent_id: str | None) -> str | None:
        """The base URL the agent's next request must go to, or ``None`` when the request is
        not an agent's (no thread id) or the agent was never placed (a call outside the gate):
        the caller leaves such a request where it was addressed.

        An agent whose replica died is moved at once to the live replica with the most free
        slots (its retry must go somewhere; the gate admits it there at its next call). Raises
        :class:`ReplicaError` when every replica is dead.
        """
        if agent_id is None:
            return None
        index = self._placement.get(agent_id)
        if index is None:
            return None
        if not self._alive[index]:
            index = await self._move_now(agent_id, index)
        self._routed_calls += 1
        return self.urls[index]

    def priority_of(self, agent_id: str) -> int | None:
        """The agent's request priority on its replica (:meth:`Gate.priority_of`)."""
        index = self._placement.get(agent_id)
        return None if index is None else self.gates[index].priority_of(agent_id)

    @property
    def routed_calls(self) -> int:
        """Requests routed so far (0 with many calls gated: the calls bypass the transport)."""
        return self._routed_calls

    def alive(self, index: int) -> bool:
        """Whether replica ``index`` takes agents."""
        return self._alive[index]

    async def mark_dead(self, index: int, reason: str = "") -> bool:
        """Take replica ``index`` out of the batch: no agent is placed there again, and its
        agents are re-placed (see the module docstring). Returns False if it was already dead.
        """
        if not self._alive[index]:
            return False
        self._alive[index] = False
        logger.warning(
            "concur: replica %d (%s) is dead%s; its %d agents are placed again elsewhere",
            index,
            self.urls[index],
            f" ({reason})" if reason else "",
            self._placed[index],
        )
        for agent_id, where in self._placement.items():
            if where == index:
                self._moved.add(agent_id)
        # Wake everyone waiting in its window: they find their replica dead and come back to be
        # placed again. A dead replica's window admits everyone; nobody sends a call there.
        await self.gates[index].window.set_limit(OPEN)
        self._dispatch()
        if self.on_dead is not None:
            await self.on_dead(index)
        return True

    def replica_statistics(self) -> list[ReplicaStatistics]:
        """Each replica's part of the batch."""
        return [
            ReplicaStatistics(
                index=i,
                url=self.urls[i],
                alive=self._alive[i],
                gate=self.gates[i].statistics(),
                placed_total=self._placed_total[i],
            )
            for i in range(len(self.gates))
        ]

    def window_changed(self) -> None:
        """A replica's window moved (the controller calls this): place waiting agents."""
        self._dispatch()

    # -- plumbing ------------------------------------------------------------------------------

    async def _leave(self, agent_id: str, index: int) -> None:
        """Take the agent out of its dead replica's gate (its slot there means nothing)."""
        if self._placement.get(agent_id) == index:
            del self._placement[agent_id]
            self._placed[index] -= 1
        self._moved.add(agent_id)
        self._carry[agent_id] = await self.gates[index].forget(agent_id)

    async def _move_now(self, agent_id: str, dead: int) -> int:
        """Re-place an agent at once (its call is in flight and must go somewhere)."""
        index = self._choose(ignore_room=True)
        if index is None:
            raise ReplicaError(
                f"agent {agent_id!r}: every replica is dead ({', '.join(self.urls)})"
            )
        # Its next call finds it placed on `index` and unknown to that gate: it is admitted
        # there as a parked agent, with its account carried over.
        self._placement[agent_id] = index
        self._moved.discard(agent_id)
        self._placed[dead] -= 1
        self._placed[index] += 1
        self._placed_total[index] += 1
        self._carry[agent_id] = await self.gates[dead].forget(agent_id)
        if self.store is not None:
            await self.store.put(agent_id, index)
        return index

    async def _place(self, agent_id: str) -> int:
        moved = agent_id in self._moved
        if not moved and self.store is not None:
            stored = await self.store.get(agent_id)
            if stored is not None and stored < len(self.gates) and self._alive[stored]:
                # Placed by a worker that is gone (its run is resumed here): back to its
                # replica, where its prefix is, ahead of new agents as a parked agent is.
                self._carry.setdefault(agent_id, None)
                self._placement[agent_id] = stored
                self._placed[stored] += 1
                self._placed_total[stored] += 1
                return stored
        index = await self._choose_for(agent_id, moved)
        if self.store is not None:
            await self.store.put(agent_id, index)
        return index

    async def _choose_for(self, agent_id: str, moved: bool) -> int:
        index = None
        if not (self._placing_moved or (not moved and self._placing_new)):
            index = self._choose()
        if index is None:
            if not any(self._alive):
                raise ReplicaError(
                    f"agent {agent_id!r}: every replica is dead ({', '.join(self.urls)})"
                )
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            (self._placing_moved if moved else self._placing_new).append(_Waiter(agent_id, future))
            try:
                index = await future
            except BaseException:
                if future.done() and not future.cancelled() and future.exception() is None:
                    self._pending[future.result()] -= 1
                    self._dispatch()
                else:
                    future.cancel()
                raise
            self._pending[index] -= 1
            if not self._alive[index]:  # died between the placement and now
                return await self._choose_for(agent_id, moved)
        self._moved.discard(agent_id)
        self._placement[agent_id] = index
        self._placed[index] += 1
        self._placed_total[index] += 1
        return index

    def _room(self, index: int) -> int:
        stats = self.gates[index].window.statistics()
        if stats.waiting_parked or stats.waiting_new:
            return 0
        return stats.limit - stats.holders - self._pending[index]

    def _choose(self, *, ignore_room: bool = False) -> int | None:
        """The live replica with the most free slots (ties: fewest agents placed, then the
        lowest index), or ``None`` when none has room (``ignore_room``: any live one)."""
        best: tuple[int, int, int] | None = None
        for i, alive in enumerate(self._alive):
            if not alive:
                continue
            room = self._room(i)
            if room <= 0 and not ignore_room:
                continue
            key = (-room, self._placed[i], i)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def _dispatch(self) -> None:
        """Place waiting agents (moved ones first, then new ones, FIFO) while a replica has
        room."""
        for queue in (self._placing_moved, self._placing_new):
            while queue:
                waiter = queue[0]
                if waiter.future.done():  # cancelled while queued
                    queue.popleft()
                    continue
                index = self._choose()
                if index is None:
                    if not any(self._alive):
                        queue.popleft()
                        waiter.future.set_exception(
                            ReplicaError(
                                f"agent {waiter.agent_id!r}: every replica is dead "
                                f"({', '.join(self.urls)})"
                            )
                        )
                        continue
                    return
                queue.popleft()
                self._pending[index] += 1
                waiter.future.set_result(index)
        self._steal()

    def _steal(self) -> None:
        """Move parked agents from a replica where they queue to one with room.

        Nobody waits to be placed (else they would have taken the room), and a replica has a
        free slot and nobody of its own waiting, while another has parked agents waiting to
        resume: the first of them (the next its replica would resume) moves to the one with
        room, which re-prefills its context; waiting on its own replica would cost until one of
        that replica's agents finishes, and its prefix there, idle, is the first to be evicted
        anyway. This is what keeps the replicas finishing together at the end of a batch,
        when one replica's agents are done while another still has a queue. An agent moves at
        most once (no ping-pong between two replicas taking turns to shrink).
        """
        while True:
            thief = self._choose()
            if thief is None:
                return
            donors = [
                (stats.waiting_parked, i)
                for i, alive in enumerate(self._alive)
                if alive
                and i != thief
                and (stats := self.gates[i].window.statistics()).waiting_parked > 0
            ]
            if not donors:
                return
            _, donor = max(donors)
            agent_id = next(
                (
                    a
                    for a in self.gates[donor].waiting_to_resume()
                    if a not in self._moved_once and a not in self._moving and a in self._tasks
                ),
                None,
            )
            if agent_id is None:
                return
            self._moved_once.add(agent_id)
            self._moving[agent_id] = thief
            self._pending[thief] += 1
            self._tasks[agent_id].cancel()

    async def _move_parked(self, agent_id: str, donor: int, to: int) -> None:
        self._pending[to] -= 1
        if not self._alive[to] or self._placement.get(agent_id) != donor:
            return  # its new replica died meanwhile, or it moved otherwise: go round again
        self._carry[agent_id] = await self.gates[donor].forget(agent_id)
        self._placement[agent_id] = to
        self._placed[donor] -= 1
        self._placed[to] += 1
        self._placed_total[to] += 1
        self.moves_total += 1
        if self.store is not None:
            await self.store.put(agent_id, to)


class _Windows:
    """Several replicas' windows seen as one, for displays: limits and counts summed (a dead
    replica's window counts for nothing)."""

    def __init__(self, windows: Sequence[AdmissionWindow], alive: Sequence[bool]) -> None:
        self.windows = list(windows)
        self._alive = alive

    def _live(self) -> list[AdmissionWindow]:
        return [w for w, alive in zip(self.windows, self._alive, strict=True) if alive]

    @property
    def limit(self) -> int:
        return min(OPEN, sum(w.limit for w in self._live()))

    def statistics(self) -> WindowStatistics:
        parts = [w.statistics() for w in self._live()]
        return WindowStatistics(
            limit=self.limit,
            holders=sum(p.holders for p in parts),
            waiting_new=sum(p.waiting_new for p in parts),
            waiting_parked=sum(p.waiting_parked for p in parts),
            admitted_total=sum(p.admitted_total for p in parts),
            resumed_total=sum(p.resumed_total for p in parts),
        )

    async def aclose(self) -> None:
        for window in self.windows:
            await window.aclose()

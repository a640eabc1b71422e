"""The admission window: agent-level slots whose number follows the controller.

An agent takes a slot (a :class:`Permit`) at its first generation step and keeps it across its
steps and tool calls until it finishes. The window's ``limit`` can move at any time:

* growing wakes ``limit - holders`` waiters at once (never ``new - old``: after a shrink that
  left holders above the limit, ``new - old`` would over-grant - trio's ``CapacityLimiter``
  documents exactly this, and we copy its semantics);
* shrinking revokes nothing. Holders above the limit are asked to give their slot back at their
  next generation step: :meth:`AdmissionWindow.must_park` names them, most recently admitted
  first, so the agents with the most sunk work keep running.

Waiters are served FIFO from two queues: agents that held a slot and parked are served before
agents that were never admitted (resuming sunk work beats starting new work, and it keeps a
parked agent's wait bounded).

Every implementation (in-process :class:`LocalWindow`, the Redis window) follows the
:class:`AdmissionWindow` protocol and passes one conformance test suite.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from concur_langgraph.checks import check_count

__all__ = ["OPEN", "AdmissionWindow", "LocalWindow", "Permit", "WindowStatistics", "window_text"]

OPEN: Final = 1 << 20
"""The window of "admit everyone": what a law that restricts nothing returns (the controller
clamps it to ``max_window``). A window this large is shown as ``open``."""


def window_text(window: int) -> str:
    """A window for people: ``open`` for :data:`OPEN` (and above), else the number."""
    return "open" if window >= OPEN else str(window)


class Permit:
    """One acquisition of a slot by one agent.

    A new object per acquisition (never ownership stored on the window), so a stale permit of an
    agent that parked and came back cannot release the slot it holds now.
    """

    __slots__ = ("agent_id", "released", "resumed", "seq")

    def __init__(self, agent_id: str, seq: int, *, resumed: bool = False) -> None:
        self.agent_id = agent_id
        #: Admission order across the window; larger = admitted more recently.
        self.seq = seq
        #: True when this permit was granted to an agent coming back from a park.
        self.resumed = resumed
        #: True once the slot was given back (or, for a distributed window, lost).
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Permit(agent_id={self.agent_id!r}, seq={self.seq}, {state})"


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowStatistics:
    """A snapshot of a window's state."""

    limit: int
    """The current window: how many agents may hold slots."""
    holders: int
    """Agents holding a slot now (may exceed ``limit`` right after a shrink)."""
    waiting_new: int
    """Agents waiting for their first slot."""
    waiting_parked: int
    """Agents that parked and wait to resume; served before ``waiting_new``."""
    admitted_total: int
    """Slots granted since the window was created (first admissions and resumptions)."""
    resumed_total: int
    """Of ``admitted_total``, the grants to agents coming back from a park."""


@runtime_checkable
class AdmissionWindow(Protocol):
    """What the gate needs from a window backend (in-process, Redis, ...)."""

    @property
    def limit(self) -> int:
        """The current window size."""
        ...

    async def set_limit(self, limit: int) -> None:
        """Resize: growing wakes ``limit - holders`` waiters; shrinking revokes nothing."""
        ...

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        """Wait for a slot, FIFO, parked agents first. Cancellation leaves nothing held."""
        ...

    def must_park(self, permit: Permit) -> bool:
        """Whether this holder should give its slot back now (synchronous, no I/O).

        True iff holders exceed the limit and ``permit`` is among the ``holders - limit`` most
        recently admitted holders.
        """
        ...

    async def release(self, permit: Permit) -> None:
        """Give the slot back. Idempotent: releasing twice is a no-op."""
        ...

    def statistics(self) -> WindowStatistics:
        """A snapshot of the window's state."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections, background tasks)."""
        ...


class _Waiter:
    __slots__ = ("agent_id", "future", "parked")

    def __init__(self, agent_id: str, parked: bool, future: asyncio.Future[Permit]) -> None:
        self.agent_id = agent_id
        self.parked = parked
        self.future = future


class LocalWindow:
    """The in-process window: one event loop, no I/O, O(1) on every common path.

    Can be built outside a running loop; futures are created on the loop that waits.
    """

    def __init__(self, limit: int = 4) -> None:
        self._limit = check_count("limit", limit, minimum=1)
        # seq -> permit; dict order is admission order because seq only grows.
        self._holders: dict[int, Permit] = {}
        self._waiting_parked: deque[_Waiter] = deque()
        self._waiting_new: deque[_Waiter] = deque()
        self._seq = itertools.count()
        self._admitted_total = 0
        self._resumed_total = 0
        # Cache of the smallest seq that must park, valid while holders and limit are unchanged.
        self._park_cut: int | None = None
        # Cancelled waiters still in each queue (index: parked). They stay queued, skipped when
        # reached, until they are half of their queue (see _forget).
        self._cancelled = [0, 0]

    @property
    def limit(self) -> int:
        return self._limit

    async def set_limit(self, limit: int) -> None:
        self.set_limit_nowait(limit)

    def set_limit_nowait(self, limit: int) -> None:
        """Synchronous :meth:`set_limit` (the local window never needs to wait)."""
        self._limit = check_count("limit", limit, minimum=1)
        self._park_cut = None
        self._wake()

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        ahead = self._waiting_parked if parked else (self._waiting_parked or self._waiting_new)
        if len(self._holders) < self._limit and not ahead:
            # Granted at once without yielding to the loop: admission of the first agents of a
            # batch and resumption into free room cost no scheduling round trip.
            return self._grant(agent_id, parked)
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(agent_id, parked, future)
        (self._waiting_parked if parked else self._waiting_new).append(waiter)
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted, then cancelled before this task resumed: give the slot back so
                # the next waiter gets it instead of leaking it.
                self.release_nowait(future.result())
            else:
                future.cancel()
                self._forget(parked)
            raise

    def must_park(self, permit: Permit) -> bool:
        holders = len(self._holders)
        if holders <= self._limit or permit.released:
            return False
        cut = self._park_cut
        if cut is None:
            # The (holders - limit) most recent holders are those after the first `limit`.
            cut = next(itertools.islice(self._holders, self._limit, None))
            self._park_cut = cut
        return permit.seq >= cut

    async def release(self, permit: Permit) -> None:
        self.release_nowait(permit)

    def release_nowait(self, permit: Permit) -> None:
        """Synchronous :meth:`release`; safe from cancellation paths."""
        if permit.released:
            return
        permit.released = True
        if self._holders.pop(permit.seq, None) is not None:
            self._park_cut = None
            self._wake()

    def statistics(self) -> WindowStatistics:
        return WindowStatistics(
            limit=self._limit,
            holders=len(self._holders),
            waiting_new=sum(1 for w in self._waiting_new if not w.future.done()),
            waiting_parked=sum(1 for w in self._waiting_parked if not w.future.done()),
            admitted_total=self._admitted_total,
            resumed_total=self._resumed_total,
        )

    async def aclose(self) -> None:
        return None

    def _grant(self, agent_id: str, parked: bool) -> Permit:
        permit = Permit(agent_id, next(self._seq), resumed=parked)
        self._holders[permit.seq] = permit
        self._park_cut = None
        self._admitted_total += 1
        if parked:
            self._resumed_total += 1
        return permit

    def _forget(self, parked: bool) -> None:
        """Account for a waiter of the ``parked`` queue cancelled while queued.

        It stays in its queue (its future is done: ``_wake`` and ``statistics`` skip it) until
        cancelled waiters are half of that queue; then one pass removes them all. O(1)
        amortised per cancellation, where removing each at once cost O(queue): 55 s to cancel
        50,000 waiters in reverse admission order.
        """
        queue = self._waiting_parked if parked else self._waiting_new
        self._cancelled[parked] += 1
        if self._cancelled[parked] * 2 > len(queue):
            live = [w for w in queue if not w.future.done()]
            queue.clear()
            queue.extend(live)
            self._cancelled[parked] = 0

    def _wake(self) -> None:
        # Wake from limit - holders, never from new - old (see the module docstring).
        while len(self._holders) < self._limit:
            queue = self._waiting_parked or self._waiting_new
            if not queue:
                return
            waiter = queue.popleft()
            if waiter.future.done():  # cancelled while queued
                self._cancelled[waiter.parked] = max(0, self._cancelled[waiter.parked] - 1)
                continue
            waiter.future.set_result(self._grant(waiter.agent_id, waiter.parked))

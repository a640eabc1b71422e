"""LocalWindow: resize semantics, FIFO, parked-first, victim choice, cancellation safety."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concur_langgraph import AdmissionWindow, ConfigError, LocalWindow, Permit


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_is_an_admission_window() -> None:
    assert isinstance(LocalWindow(2), AdmissionWindow)


@pytest.mark.parametrize("bad", [0, -3, 1.5, "4", True, None])
def test_bad_limit_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match="limit"):
        LocalWindow(bad)  # type: ignore[arg-type]


async def test_set_limit_validates() -> None:
    w = LocalWindow(2)
    with pytest.raises(ConfigError, match="limit: must be an integer >= 1"):
        await w.set_limit(0)
    assert w.limit == 2


async def test_immediate_grant_does_not_yield() -> None:
    w = LocalWindow(1)
    coro = w.acquire("a")
    # A coroutine that completes without suspending raises StopIteration on its first send.
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    permit = done.value.value
    assert isinstance(permit, Permit) and permit.agent_id == "a"


async def test_fifo_for_new_agents() -> None:
    w = LocalWindow(1)
    first = await w.acquire("first")
    order: list[str] = []

    async def take(name: str) -> Permit:
        p = await w.acquire(name)
        order.append(name)
        return p

    tasks = [asyncio.create_task(take(n)) for n in ("a", "b", "c")]
    await settle()
    assert order == []
    await w.release(first)
    for expected in ("a", "b", "c"):
        await settle()
        assert order[-1] == expected
        await w.release(tasks["abc".index(expected)].result())


async def test_parked_agents_resume_before_new_ones() -> None:
    w = LocalWindow(1)
    holder = await w.acquire("holder")
    new = asyncio.create_task(w.acquire("new"))
    await settle()
    parked = asyncio.create_task(w.acquire("came-back", parked=True))
    await settle()
    await w.release(holder)
    await settle()
    assert parked.done() and not new.done()
    assert parked.result().resumed
    await w.release(parked.result())
    await settle()
    assert new.done()


async def test_grow_wakes_limit_minus_holders() -> None:
    w = LocalWindow(1)
    await w.acquire("h")
    waiters = [asyncio.create_task(w.acquire(f"w{i}")) for i in range(5)]
    await settle()
    await w.set_limit(4)
    await settle()
    assert sum(t.done() for t in waiters) == 3
    assert w.statistics().holders == 4


async def test_shrink_then_grow_does_not_over_grant() -> None:
    # 4 holders, shrink to 1 (nobody revoked), grow to 3: still 4 holders >= 3, so nobody
    # is woken. Waking new - old (= 2) would give 6 holders for a window of 3.
    w = LocalWindow(4)
    for i in range(4):
        await w.acquire(f"h{i}")
    waiters = [asyncio.create_task(w.acquire(f"w{i}")) for i in range(3)]
    await settle()
    await w.set_limit(1)
    await w.set_limit(3)
    await settle()
    assert not any(t.done() for t in waiters)
    assert w.statistics().holders == 4
    for t in waiters:
        t.cancel()
    await settle()


async def test_must_park_picks_most_recently_admitted() -> None:
    w = LocalWindow(5)
    permits = [await w.acquire(f"a{i}") for i in range(5)]
    assert not any(w.must_park(p) for p in permits)
    await w.set_limit(3)
    assert [w.must_park(p) for p in permits] == [False, False, False, True, True]
    await w.release(permits[4])  # the newest parks: now only one too many
    assert [w.must_park(p) for p in permits[:4]] == [False, False, False, True]
    await w.release(permits[0])  # an old holder finishes: no longer over-committed
    assert not any(w.must_park(p) for p in permits[1:4])


async def test_release_is_idempotent() -> None:
    w = LocalWindow(1)
    p = await w.acquire("a")
    waiter = asyncio.create_task(w.acquire("b"))
    await settle()
    await w.release(p)
    await w.release(p)
    await settle()
    assert waiter.done()
    assert w.statistics().holders == 1
    stale = p
    await w.release(stale)  # a stale permit cannot release b's slot
    assert w.statistics().holders == 1


async def test_cancelled_waiter_holds_nothing() -> None:
    w = LocalWindow(1)
    p = await w.acquire("a")
    waiter = asyncio.create_task(w.acquire("b"))
    await settle()
    waiter.cancel()
    await settle()
    await w.release(p)
    stats = w.statistics()
    assert stats.holders == 0 and stats.waiting_new == 0


async def test_cancel_after_grant_gives_the_slot_back() -> None:
    w = LocalWindow(1)
    p = await w.acquire("a")
    waiter = asyncio.create_task(w.acquire("b"))
    third = asyncio.create_task(w.acquire("c"))
    await settle()
    # Grant to b, then cancel b before it runs: its slot must pass to c, not leak.
    await w.release(p)
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert third.done()
    assert w.statistics().holders == 1


@pytest.mark.parametrize("parked", [False, True])
async def test_mass_cancellation_keeps_queues_small_and_survivors_fifo(parked: bool) -> None:
    # Cancelling waiters in reverse order used to remove each from its deque (O(queue) each:
    # 55 s for 50,000). Cancelled waiters are now skipped and compacted away in bulk; what
    # must hold: counts stay exact, a queue never holds more than twice its live waiters (plus
    # one), and the survivors are still served first come, first served.
    w = LocalWindow(1)
    p = await w.acquire("holder")
    n = 200
    tasks = [asyncio.create_task(w.acquire(f"a{i}", parked=parked)) for i in range(n)]
    await settle()
    queue = w._waiting_parked if parked else w._waiting_new  # the queue the fix bounds
    survivors = {0, 3, 50, 199}
    for i in reversed(range(n)):
        if i in survivors:
            continue
        tasks[i].cancel()
        await settle()
        stats = w.statistics()
        live = sum(1 for t in tasks if not t.done())
        assert (stats.waiting_parked if parked else stats.waiting_new) == live
        assert len(queue) <= 2 * live + 1
    granted: list[Permit] = []
    await w.release(p)
    for _ in survivors:
        await settle()
        (permit,) = [
            t.result()
            for t in tasks
            if t.done() and not t.cancelled() and t.result() not in granted
        ]
        granted.append(permit)
        await w.release(permit)
    assert [g.agent_id for g in granted] == [f"a{i}" for i in sorted(survivors)]
    assert w.statistics().holders == 0 and len(queue) == 0


# --- property tests -------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("limit"), st.integers(1, 6)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(initial=st.integers(1, 5), script=ops)
def test_invariants_under_random_operations(initial: int, script: list[tuple[str, object]]) -> None:
    asyncio.run(_run_script(initial, script))


async def _run_script(initial: int, script: list[tuple[str, object]]) -> None:
    w = LocalWindow(initial)
    bound = initial  # max(limit, holders at the last shrink)
    tasks: list[tuple[str, bool, asyncio.Task[Permit]]] = []
    grant_order: list[tuple[str, bool]] = []
    released: set[int] = set()

    async def take(name: str, parked: bool) -> Permit:
        permit = await w.acquire(name, parked=parked)
        grant_order.append((name, parked))
        return permit

    for i, (op, arg) in enumerate(script):
        granted_before = len(grant_order)
        if op == "acquire":
            name = f"agent{i}"
            tasks.append((name, bool(arg), asyncio.create_task(take(name, bool(arg)))))
        elif op == "release":
            held = [t for t in tasks if t[2].done() and not t[2].cancelled()]
            held = [t for t in held if id(t[2]) not in released]
            if held:
                _, _, task = held[int(arg) % len(held)]  # type: ignore[call-overload]
                released.add(id(task))
                await w.release(task.result())
        elif op == "cancel":
            pending = [t for t in tasks if not t[2].done()]
            if pending:
                pending[int(arg) % len(pending)][2].cancel()  # type: ignore[call-overload]
        else:
            holders = w.statistics().holders
            bound = max(int(arg), holders)  # type: ignore[call-overload]
            await w.set_limit(int(arg))  # type: ignore[call-overload]
        await settle()
        stats = w.statistics()
        assert stats.holders <= max(stats.limit, bound)
        if stats.holders < stats.limit:
            # Free room and someone waiting would be a lost wake-up.
            assert stats.waiting_new == 0 and stats.waiting_parked == 0
        if stats.waiting_parked:
            # Parked-first: a new agent was not admitted while a parked one still waits.
            assert all(parked for _, parked in grant_order[granted_before:])
        bound = max(stats.limit, min(bound, stats.holders))

    # FIFO and parked-first: among grants made while both kinds waited, order is preserved
    # per queue (acquire order within each kind).
    for parked in (True, False):
        granted = [n for n, p in grant_order if p is parked]
        requested = [n for n, p, t in tasks if p is parked and not t.cancelled() and t.done()]
        assert granted == sorted(granted, key=lambda n: int(n.removeprefix("agent")))
        assert sorted(granted) == sorted(requested)

    # No leak, no deadlock: releasing everything serves every remaining waiter.
    while True:
        await settle()
        held = [t for _, _, t in tasks if t.done() and not t.cancelled() and id(t) not in released]
        if not held:
            break
        for t in held:
            released.add(id(t))
            await w.release(t.result())
    await settle()
    assert all(t.done() for _, _, t in tasks)
    stats = w.statistics()
    assert stats.holders == 0 and stats.waiting_new == 0 and stats.waiting_parked == 0

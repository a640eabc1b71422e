"""One behavioural contract, two backends: LocalWindow and RedisWindow must agree.

FIFO, parked-first, trio resize semantics (grow wakes ``limit - holders``, shrink revokes
nothing, shrink-then-grow does not over-grant), victims = most recently admitted, idempotent
release, cancellation safety, and the random-operation invariants.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_support import enqueue, eventually, settle

from concur_langgraph import AdmissionWindow, ConfigError, LocalWindow, Permit, RedisWindow
from concur_langgraph.testing.redis_server import RedisServer

MakeWindow = Callable[[int], AdmissionWindow]
BACKENDS = ["local", pytest.param("redis", marks=pytest.mark.redis)]


def _factory(backend: str, url: str, opened: list[AdmissionWindow]) -> MakeWindow:
    def make(limit: int) -> AdmissionWindow:
        w: AdmissionWindow
        if backend == "local":
            w = LocalWindow(limit)
        else:
            w = RedisWindow(url, batch_id=f"conf-{uuid.uuid4().hex[:12]}", initial_limit=limit)
        opened.append(w)
        return w

    return make


@pytest.fixture(params=BACKENDS)
async def make_window(request: pytest.FixtureRequest) -> AsyncIterator[MakeWindow]:
    opened: list[AdmissionWindow] = []
    # Only the Redis half needs the server (and starts it).
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    yield _factory(request.param, url, opened)
    for w in opened:
        await w.aclose()


async def test_is_an_admission_window(make_window: MakeWindow) -> None:
    assert isinstance(make_window(2), AdmissionWindow)


async def test_set_limit_validates(make_window: MakeWindow) -> None:
    w = make_window(2)
    with pytest.raises(ConfigError, match="limit: must be an integer >= 1"):
        await w.set_limit(0)
    assert w.limit == 2


async def test_fifo_for_new_agents(make_window: MakeWindow) -> None:
    w = make_window(1)
    first = await w.acquire("first")
    order: list[str] = []
    tasks = {}
    for name in ("a", "b", "c"):
        tasks[name] = await enqueue(w, name)
        tasks[name].add_done_callback(lambda _t, n=name: order.append(n))
    await settle()
    assert order == []
    await w.release(first)
    for expected in ("a", "b", "c"):
        await eventually(lambda e=expected: e in order, what=f"{expected} admitted")  # type: ignore[misc]
        await settle()
        assert order[-1] == expected
        await w.release(tasks[expected].result())


async def test_parked_agents_resume_before_new_ones(make_window: MakeWindow) -> None:
    w = make_window(1)
    holder = await w.acquire("holder")
    new = await enqueue(w, "new")
    parked = await enqueue(w, "came-back", parked=True)
    await w.release(holder)
    await eventually(parked.done, what="parked agent resumed")
    await settle()
    assert not new.done()
    assert parked.result().resumed
    await w.release(parked.result())
    await eventually(new.done, what="new agent admitted")
    assert w.statistics().resumed_total == 1


async def test_grow_wakes_limit_minus_holders(make_window: MakeWindow) -> None:
    w = make_window(1)
    await w.acquire("h")
    waiters = [await enqueue(w, f"w{i}") for i in range(5)]
    await w.set_limit(4)
    await eventually(lambda: sum(t.done() for t in waiters) == 3, what="3 waiters admitted")
    await settle()
    assert sum(t.done() for t in waiters) == 3
    assert [t.done() for t in waiters] == [True, True, True, False, False]  # FIFO
    assert w.statistics().holders == 4


async def test_shrink_then_grow_does_not_over_grant(make_window: MakeWindow) -> None:
    # 4 holders, shrink to 1 (nobody revoked), grow to 3: still 4 holders >= 3, so nobody is
    # woken. Waking new - old (= 2) would give 6 holders for a window of 3.
    w = make_window(4)
    for i in range(4):
        await w.acquire(f"h{i}")
    waiters = [await enqueue(w, f"w{i}") for i in range(3)]
    await w.set_limit(1)
    await w.set_limit(3)
    await settle()
    assert not any(t.done() for t in waiters)
    stats = w.statistics()
    assert (stats.limit, stats.holders, stats.waiting_new) == (3, 4, 3)
    for t in waiters:
        t.cancel()
    await asyncio.wait(waiters)


async def test_must_park_picks_most_recently_admitted(make_window: MakeWindow) -> None:
    w = make_window(5)
    permits = [await w.acquire(f"a{i}") for i in range(5)]
    assert not any(w.must_park(p) for p in permits)
    await w.set_limit(3)
    assert [w.must_park(p) for p in permits] == [False, False, False, True, True]
    await w.release(permits[4])  # the newest parks: now only one too many
    assert [w.must_park(p) for p in permits[:4]] == [False, False, False, True]
    await w.release(permits[0])  # an old holder finishes: no longer over-committed
    assert not any(w.must_park(p) for p in permits[1:4])
    assert not w.must_park(permits[4])  # a released permit never has to park


async def test_release_is_idempotent_and_stale_permits_release_nothing(
    make_window: MakeWindow,
) -> None:
    w = make_window(1)
    p = await w.acquire("a")
    waiter = await enqueue(w, "a")  # the same agent, a new acquisition
    await w.release(p)
    await w.release(p)
    await eventually(waiter.done, what="second acquisition granted")
    assert w.statistics().holders == 1
    await w.release(p)  # the stale permit cannot release the new one's slot
    assert w.statistics().holders == 1
    assert p.released and not waiter.result().released


async def test_cancelled_waiter_holds_nothing(make_window: MakeWindow) -> None:
    w = make_window(1)
    p = await w.acquire("a")
    waiter = await enqueue(w, "b")
    waiter.cancel()
    await asyncio.wait([waiter])
    assert waiter.cancelled()
    await w.release(p)
    stats = w.statistics()
    assert (stats.holders, stats.waiting_new, stats.waiting_parked) == (0, 0, 0)


async def test_cancel_after_grant_gives_the_slot_back(make_window: MakeWindow) -> None:
    w = make_window(1)
    p = await w.acquire("a")
    waiter = await enqueue(w, "b")
    third = await enqueue(w, "c")
    # Grant to b, then cancel b before it runs: its slot must pass to c, not leak.
    await w.release(p)
    waiter.cancel()
    await asyncio.wait([waiter])
    assert waiter.cancelled()
    await eventually(third.done, what="c admitted")
    assert w.statistics().holders == 1
    await w.release(third.result())
    assert w.statistics().holders == 0


async def test_cancel_during_the_first_round_trip_holds_nothing(make_window: MakeWindow) -> None:
    w = make_window(1)
    holder = await w.acquire("holder")
    task = asyncio.create_task(w.acquire("x"))
    await asyncio.sleep(0)  # started (for Redis: the request may be on the wire)
    task.cancel()
    await asyncio.wait([task])
    await w.release(holder)
    nxt = await w.acquire("y")  # x's arrival (if any) was withdrawn: y gets the slot at once
    stats = w.statistics()
    assert (stats.holders, stats.waiting_new) == (1, 0)
    await w.release(nxt)


# --- random operations ----------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("limit"), st.integers(1, 6)),
    ),
    max_size=30,
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants_under_random_operations(backend: str, redis_server: RedisServer) -> None:
    # Fewer examples than the local suite: each Redis example is a fresh batch on a real server.
    @settings(max_examples=20, deadline=None)
    @given(initial=st.integers(1, 4), script=ops)
    def check(initial: int, script: list[tuple[str, object]]) -> None:
        asyncio.run(_run_script(_factory(backend, redis_server.url, []), initial, script))

    check()


async def _run_script(make: MakeWindow, initial: int, script: list[tuple[str, object]]) -> None:
    w = make(initial)
    try:
        await _check_script(w, initial, script)
    finally:
        await w.aclose()


async def _check_script(w: AdmissionWindow, initial: int, script: list[tuple[str, object]]) -> None:
    bound = initial  # max(limit, holders at the last shrink)
    tasks: list[tuple[str, bool, asyncio.Task[Permit]]] = []
    grant_order: list[tuple[str, bool]] = []
    released: set[int] = set()

    for i, (op, arg) in enumerate(script):
        granted_before = len(grant_order)
        if op == "acquire":
            name = f"agent{i}"
            task = await enqueue(w, name, parked=bool(arg))
            task.add_done_callback(
                lambda t, n=name, p=bool(arg): None if t.cancelled() else grant_order.append((n, p))
            )
            tasks.append((name, bool(arg), task))
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
                victim = pending[int(arg) % len(pending)][2]  # type: ignore[call-overload]
                victim.cancel()
                await asyncio.wait([victim])
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

    for parked in (True, False):
        granted = [n for n, p in grant_order if p is parked]
        assert granted == sorted(granted, key=lambda n: int(n.removeprefix("agent")))

    # No leak, no deadlock: releasing everything serves every remaining waiter.
    while True:
        await settle()
        held = [t for _, _, t in tasks if t.done() and not t.cancelled() and id(t) not in released]
        pending = [t for _, _, t in tasks if not t.done()]
        if not held and not pending:
            break
        if not held:
            await eventually(
                lambda p=pending: any(t.done() for t in p),  # type: ignore[misc]
                what="a waiter admitted",
            )
            continue
        for t in held:
            released.add(id(t))
            await w.release(t.result())
    stats = w.statistics()
    assert (stats.holders, stats.waiting_new, stats.waiting_parked) == (0, 0, 0)

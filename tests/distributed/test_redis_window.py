"""RedisWindow specifics: options, sharing across instances, namespaces, outages, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid

import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_support import enqueue, eventually

from concur_langgraph import ConfigError
from concur_langgraph.distributed.redis_window import RedisWindow, WindowBackendError, import_redis
from concur_langgraph.testing.redis_server import RedisServer


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_id": ""}, "batch_id"),
        ({"batch_id": "a{b}"}, "batch_id"),
        ({"batch_id": "b", "initial_limit": 0}, "initial_limit"),
        ({"batch_id": "b", "lease_ttl_s": 0}, "lease_ttl_s"),
        ({"batch_id": "b", "lease_ttl_s": 1.0, "heartbeat_s": 1.0}, "heartbeat_s"),
        ({"batch_id": "b", "op_timeout_s": 0}, "op_timeout_s"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        RedisWindow("redis://127.0.0.1:1/0", **kwargs)  # type: ignore[arg-type]


def test_bad_url_names_the_field() -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        RedisWindow("http://localhost:6379", batch_id="b")


def test_missing_redis_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'concur-langgraph\[redis\]'"):
        import_redis()


async def test_unreachable_redis_raises_a_translated_error() -> None:
    window = RedisWindow(
        "redis://127.0.0.1:1/0", batch_id="b", reconnect_timeout_s=0.1, op_timeout_s=0.5
    )
    with pytest.raises(WindowBackendError, match="unreachable") as info:
        await window.acquire("a")
    assert isinstance(info.value.__cause__, RedisConnectionError)
    await window.aclose()


async def test_instances_share_one_window_and_learn_changes_without_io(
    redis_url: str, batch_id: str
) -> None:
    async with (
        RedisWindow(redis_url, batch_id=batch_id, initial_limit=3) as w1,
        RedisWindow(redis_url, batch_id=batch_id, initial_limit=99) as w2,
    ):
        assert w2.limit == 3  # the first process created the batch; later ones join it
        old = [await w1.acquire(f"a{i}") for i in range(2)]
        newest = await w2.acquire("b")
        assert w2.statistics().holders == 3
        await w1.set_limit(2)
        # w2 does no I/O here: the resize reaches it through the events channel.
        await eventually(lambda: w2.limit == 2, what="w2 to see the shrink")
        assert w2.must_park(newest)
        assert not any(w1.must_park(p) for p in old)
        waiter = await enqueue(w1, "c")
        await w2.release(newest)
        await w1.release(old[0])
        await eventually(waiter.done, what="w1's waiter admitted after w2's release")


async def test_fifo_across_instances(redis_url: str, batch_id: str) -> None:
    async with (
        RedisWindow(redis_url, batch_id=batch_id, initial_limit=1) as w1,
        RedisWindow(redis_url, batch_id=batch_id, initial_limit=1) as w2,
    ):
        holder = await w1.acquire("h")
        order: list[str] = []
        tasks = []
        for name, w in (("x1", w2), ("y1", w1), ("x2", w2), ("y2", w1)):
            task = await enqueue(w, name)
            task.add_done_callback(lambda _t, n=name: order.append(n))
            tasks.append((w, task))
        await w1.release(holder)
        for i, (w, task) in enumerate(tasks):
            await eventually(task.done, what=f"grant {i}")
            await w.release(task.result())
        assert order == ["x1", "y1", "x2", "y2"]


async def test_batches_are_independent(redis_url: str) -> None:
    async with (
        RedisWindow(redis_url, batch_id=f"a-{uuid.uuid4().hex}", initial_limit=1) as wa,
        RedisWindow(redis_url, batch_id=f"b-{uuid.uuid4().hex}", initial_limit=1) as wb,
    ):
        await wa.acquire("x")
        await wb.acquire("x")  # would wait forever if the batches shared a window
        assert wa.statistics().holders == 1 and wb.statistics().holders == 1


async def test_a_missed_notification_is_caught_up(redis_url: str, batch_id: str) -> None:
    admin = redis_asyncio.Redis.from_url(redis_url)
    try:
        async with (
            RedisWindow(redis_url, batch_id=batch_id, initial_limit=1) as w1,
            RedisWindow(redis_url, batch_id=batch_id, initial_limit=1, lease_ttl_s=1.0) as w2,
        ):
            holder = await w1.acquire("h")
            waiter = await enqueue(w2, "w")
            # Drop every subscriber connection: w2 will miss the grant's notification.
            await admin.client_kill_filter(_type="pubsub")
            await w1.release(holder)
            # Caught up by the resubscription's catch-up or by the heartbeat (fallback poll).
            await eventually(waiter.done, timeout_s=5 * w2.heartbeat_s + 2, what="grant found")
            assert not waiter.result().released
    finally:
        await admin.aclose()


async def test_restart_without_persistence_rebuilds_holders_waiters_and_limit(
    batch_id: str,
) -> None:
    with RedisServer() as server:
        async with (
            RedisWindow(server.url, batch_id=batch_id, initial_limit=2, lease_ttl_s=1.0) as w1,
            RedisWindow(server.url, batch_id=batch_id, initial_limit=2, lease_ttl_s=1.0) as w2,
        ):
            await w1.set_limit(3)
            held = [await w1.acquire(f"a{i}") for i in range(2)]
            held.append(await w2.acquire("b"))
            parked = await enqueue(w2, "p", parked=True)
            new = await enqueue(w1, "n")
            server.restart(kill=True)  # every key of the batch is gone
            # Nothing is granted until both processes re-registered: 3 holders, 2 waiters,
            # not 4 holders (w1's new waiter taking the slot of w2's not-yet-back holder).

            async def rebuilt() -> bool:
                s1 = await w1.refresh()
                s2 = await w2.refresh()
                return s1 == s2 and (s1.limit, s1.holders, s1.waiting_parked, s1.waiting_new) == (
                    3,
                    3,
                    1,
                    1,
                )

            for _ in range(500):
                # refresh() may fail while the pool's broken connections are replaced.
                with contextlib.suppress(WindowBackendError):
                    if await rebuilt():
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"not rebuilt: {w1.statistics()} / {w2.statistics()}")
            assert not any(p.released for p in held)  # holders kept their slots
            assert not any(w1.must_park(p) or w2.must_park(p) for p in held)
            await w1.release(held[0])
            # Grants resume after the recovery grace (one lease TTL), parked agents first.
            await eventually(parked.done, what="the parked waiter resumes first")
            assert not new.done()
            new.cancel()
            await asyncio.wait([new])


async def test_holders_stop_vouching_for_their_slots_while_redis_is_down(batch_id: str) -> None:
    with RedisServer() as server:
        async with RedisWindow(
            server.url, batch_id=batch_id, initial_limit=2, lease_ttl_s=0.5, heartbeat_s=0.1
        ) as w:
            permit = await w.acquire("a")
            assert not w.must_park(permit)
            server.stop(kill=True)
            # No renewal can land: once the lease may have lapsed, the gate is told to park.
            await eventually(lambda: w.must_park(permit), timeout_s=5.0, what="lease unvouched")
            await w.release(permit)  # cannot reach Redis: dropped locally, the lease lapses
            assert permit.released
            server.start()
            again = await asyncio.wait_for(w.acquire("a", parked=True), 10.0)
            assert again.resumed and not w.must_park(again)

"""Leadership: one leader per batch, takeover after a lapse, fenced resizes, clean hand-over."""

from __future__ import annotations

import asyncio

import pytest
from redis_support import eventually

from concur_langgraph import ConfigError, RedisWindow
from concur_langgraph.distributed.leader import Leadership

TTL = 0.6


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match="renew_s"):
        Leadership("redis://127.0.0.1:1/0", batch_id="b", ttl_s=1.0, renew_s=2.0)
    with pytest.raises(ConfigError, match="owner"):
        Leadership("redis://127.0.0.1:1/0", batch_id="b", owner="a|b")


async def test_exactly_one_leader(redis_url: str, batch_id: str) -> None:
    async with (
        Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as a,
        Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as b,
        Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as c,
    ):
        campaigns = (a, b, c)
        assert [x.is_leader for x in campaigns] == [True, False, False]
        assert a.epoch is not None and b.epoch is None


async def test_a_stalled_leader_is_replaced_and_fenced_out(redis_url: str, batch_id: str) -> None:
    async with (
        RedisWindow(redis_url, batch_id=batch_id, initial_limit=4) as window,
        Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as old,
        Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as new,
    ):
        assert old.is_leader
        stale_token = old.token
        assert stale_token is not None
        await old.fence(window).set_limit(6)
        assert window.limit == 6
        # The old leader stops renewing (a stalled process): the follower takes over.
        assert old._task is not None
        old._task.cancel()
        await eventually(lambda: new.is_leader, timeout_s=5 * TTL, what="takeover")
        assert new.epoch is not None and old.epoch is None
        await new.fence(window).set_limit(3)
        # A write carrying the old reign's token is refused atomically, however late it comes.
        assert not await window.set_limit_fenced(9, fence=stale_token)
        fenced = old.fence(window)
        await fenced.set_limit(9)
        assert fenced.fenced_out == 1
        assert (await window.refresh()).limit == 3


async def test_a_clean_exit_hands_over_without_waiting_for_the_lease(
    redis_url: str, batch_id: str
) -> None:
    # A lease far longer than the test's deadline: only the resignation can explain a takeover.
    leader = Leadership(redis_url, batch_id=batch_id, ttl_s=30.0, renew_s=0.05)
    await leader.__aenter__()
    try:
        async with Leadership(redis_url, batch_id=batch_id, ttl_s=30.0, renew_s=0.05) as follower:
            assert leader.is_leader and not follower.is_leader
            await leader.__aexit__(None, None, None)
            await eventually(lambda: follower.is_leader, timeout_s=5.0, what="hand-over")
    finally:
        await leader.__aexit__(None, None, None)


async def test_wait_leader_and_wait_lost(redis_url: str, batch_id: str) -> None:
    async with Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as first:
        async with Leadership(redis_url, batch_id=batch_id, ttl_s=TTL) as second:
            waiting = asyncio.create_task(second.wait_leader())
            await asyncio.sleep(0)
            assert not waiting.done()
            lost = asyncio.create_task(first.wait_lost())
            assert first._task is not None
            first._task.cancel()  # stalls: its lease lapses locally and in Redis
            async with asyncio.timeout(5 * TTL):
                await lost
                await waiting
            assert second.is_leader and not first.is_leader

"""A worker process for the multi-process Redis tests (run as a script, not collected).

Runs ``--agents`` fake agents through the real :class:`Gate` on a shared :class:`RedisWindow`:
each agent makes ``--steps`` "LLM calls" of ``--call-s`` separated by "tool calls" of
``--tool-s``. At every call start an atomic probe in Redis records the call in a zset of calls in
flight (each entry expires after its call) and returns how many calls are in flight across all
workers and the window: more calls in flight than the window is an invariant violation.

With ``--leader`` it also campaigns for leadership and, while leader, drives the window like a
controller would: from the stored value, +1 every ``--lead-period`` (cycling in 1..max).

Events go to stdout as JSON lines: ready, leader, set, done, finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from concur_langgraph import Gate, Permit
from concur_langgraph.distributed.leader import Leadership
from concur_langgraph.distributed.redis_window import RedisWindow, batch_key

_PROBE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""


async def robust(call: Callable[[], Awaitable[Any]]) -> Any:
    """Test instrumentation must survive a Redis restart: retry for a while."""
    from redis.exceptions import ConnectionError, TimeoutError

    for _ in range(600):
        try:
            return await call()
        except (ConnectionError, TimeoutError, OSError):
            await asyncio.sleep(0.05)
    raise RuntimeError("redis unreachable for 30 s")


def emit(ev: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": ev, **fields}) + "\n")
    sys.stdout.flush()


class CountingWindow:
    """Delegates to the RedisWindow; counts re-queues (acquire with parked=True)."""

    def __init__(self, window: RedisWindow) -> None:
        self.window = window
        self.requeues = 0

    @property
    def limit(self) -> int:
        return self.window.limit

    async def set_limit(self, limit: int) -> None:
        await self.window.set_limit(limit)

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        if parked:
            self.requeues += 1
        return await self.window.acquire(agent_id, parked=parked)

    def must_park(self, permit: Permit) -> bool:
        return self.window.must_park(permit)

    async def release(self, permit: Permit) -> None:
        await self.window.release(permit)

    def statistics(self) -> Any:
        return self.window.statistics()

    async def aclose(self) -> None:
        await self.window.aclose()


async def lead(args: argparse.Namespace, window: RedisWindow) -> None:
    async with Leadership(args.url, batch_id=args.batch, ttl_s=args.leader_ttl) as lead:
        while True:
            await lead.wait_leader()
            await window.refresh()
            value = window.limit
            emit("leader", owner=lead.owner, epoch=lead.epoch, start=value)
            fenced = lead.fence(window)
            while lead.is_leader:
                value = value % args.max_limit + 1
                await fenced.set_limit(value)
                emit("set", limit=value, epoch=lead.epoch, landed=fenced.fenced_out == 0)
                await asyncio.sleep(args.lead_period)


async def main(args: argparse.Namespace) -> None:
    window = RedisWindow(
        args.url,
        batch_id=args.batch,
        initial_limit=args.limit,
        lease_ttl_s=args.ttl,
        heartbeat_s=args.hb,
        reconnect_timeout_s=args.reconnect,
    )
    counting = CountingWindow(window)
    gate = Gate(counting)
    active_key = batch_key(args.batch, "test:inflight")
    limit_key = batch_key(args.batch, "limit")
    violations = 0
    max_excess = 0

    async with window:
        assert window._client is not None
        probe = window._client.register_script(_PROBE)
        call_ms = str(round(args.call_s * 1000) + 100)
        emit("ready", pid_name=args.name)
        leader_task = asyncio.create_task(lead(args, window)) if args.leader else None

        async def agent(i: int) -> None:
            nonlocal violations, max_excess
            aid = f"{args.name}-{i}"
            try:
                for step in range(args.steps):
                    await gate.before_llm_call(aid)
                    if args.hold:
                        # real-time ok: a holder that never lets go; the test kills this process.
                        await asyncio.sleep(3600)
                    if step == 0 and args.wait_file:
                        # Keep the slot, doing nothing, until the test says go: makes "still
                        # holding when the other worker arrives" independent of start-up time.
                        # A file from another process: nothing in this loop can signal it.
                        while not os.path.exists(args.wait_file):  # noqa: ASYNC110, ASYNC240
                            await asyncio.sleep(0.05)
                    inflight, limit = await robust(
                        lambda: probe(keys=[active_key, limit_key], args=[aid, call_ms])
                    )
                    # limit 0: Redis restarted and nobody restored the window yet.
                    if limit and inflight > limit:
                        violations += 1
                        max_excess = max(max_excess, inflight - limit)
                    await asyncio.sleep(args.call_s)
                    await robust(lambda: window._client.zrem(active_key, aid))  # type: ignore[union-attr]
                    await asyncio.sleep(args.tool_s)
            finally:
                await gate.release(aid)
            emit("done", agent=aid)

        await asyncio.gather(*(agent(i) for i in range(args.agents)))
        if leader_task is not None:
            await asyncio.sleep(args.run_s)
            leader_task.cancel()
        emit(
            "finished",
            requeues=counting.requeues,
            violations=violations,
            max_excess=max_excess,
            parks=gate.statistics().parks_total,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--call-s", type=float, default=0.02)
    parser.add_argument("--tool-s", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--hb", type=float, default=0.2)
    parser.add_argument("--reconnect", type=float, default=30.0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--wait-file", default="")
    parser.add_argument("--leader", action="store_true")
    parser.add_argument("--leader-ttl", type=float, default=1.0)
    parser.add_argument("--lead-period", type=float, default=0.05)
    parser.add_argument("--max-limit", type=int, default=8)
    parser.add_argument("--run-s", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))

"""Cost of the distributed window: RedisWindow against a loopback redis-server.

Usage: .venv/bin/python benchmarks/redis_window.py [--url redis://...] [--ops 3000]
       [--concurrency 32] [--seconds 3] [--changes 300]

Measures, on one batch:

* ``acquire+release``: one uncontended acquisition and its release, back to back (two Lua
  scripts, two round trips), p50/p99/max in milliseconds (target p99 < 3 ms on loopback);
* ``throughput``: ``--concurrency`` tasks cycling acquire/release for ``--seconds``, window large
  enough for all (uncontended) and window = concurrency / 4 (contended: every release grants a
  waiter and notifies it), in acquire+release pairs per second;
* ``propagation``: from ``set_limit`` being sent by one RedisWindow (the leader) until a second
  RedisWindow in another process (the follower, own connections) sees the new limit locally,
  p50/p99/max in milliseconds. Both processes read the same system-wide monotonic clock;
* ``must_park``: the gate's per-call check on the follower side (local, no I/O), in ns.

Without ``--url`` it starts its own redis-server (``concur_langgraph.testing.redis_server``).
Wall-clock numbers: report the machine and how busy it was with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from concur_langgraph import RedisWindow
from concur_langgraph.testing.redis_server import RedisServer


def _pct(sorted_s: list[float], q: float) -> float:
    return round(sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1000.0, 3)


def _summary_ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": _pct(samples, 0.50),
        "p99_ms": _pct(samples, 0.99),
        "max_ms": round(samples[-1] * 1000.0, 3),
        "mean_ms": round(statistics.fmean(samples) * 1000.0, 3),
        "n": len(samples),
    }


async def _latency(url: str, ops: int) -> dict[str, float]:
    async with RedisWindow(url, batch_id=f"bench-{uuid.uuid4().hex[:8]}", initial_limit=4) as w:
        for _ in range(200):  # warm the pool and the script cache
            await w.release(await w.acquire("warm"))
        samples = []
        for _ in range(ops):
            t0 = time.perf_counter()
            permit = await w.acquire("a")
            await w.release(permit)
            samples.append(time.perf_counter() - t0)
    return _summary_ms(samples)


async def _throughput(url: str, concurrency: int, seconds: float, limit: int) -> dict[str, Any]:
    batch = f"bench-{uuid.uuid4().hex[:8]}"
    async with RedisWindow(url, batch_id=batch, initial_limit=limit) as w:
        done = 0
        stop = time.perf_counter() + seconds

        async def cycle(i: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                permit = await w.acquire(f"a{i}")
                await w.release(permit)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(cycle(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "pairs_per_s": round(done / elapsed, 1),
        "concurrency": concurrency,
        "limit": limit,
        "seconds": round(elapsed, 2),
    }


async def _follower(url: str, batch: str) -> None:
    """Child process: print (monotonic time, limit) when a notification changes the limit."""
    async with RedisWindow(url, batch_id=batch, initial_limit=1) as w:
        seen = w.limit
        apply = w._apply

        def traced(data: dict[str, Any]) -> None:
            # Timestamp the moment the gate's local view changes (no polling loop to skew it).
            nonlocal seen
            apply(data)
            if w.limit != seen:
                seen = w.limit
                print(f"{time.monotonic():.9f} {seen}", flush=True)

        w._apply = traced  # type: ignore[method-assign]
        print("ready", flush=True)
        await asyncio.sleep(120)


async def _propagation(url: str, changes: int) -> dict[str, float]:
    batch = f"bench-{uuid.uuid4().hex[:8]}"
    async with RedisWindow(url, batch_id=batch, initial_limit=1) as leader:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--follower", batch, "--url", url,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        samples = []
        for i in range(changes):
            value = 2 + i % 50
            if value == leader.limit:
                value += 1
            t0 = time.monotonic()
            await leader.set_limit(value)
            while True:
                seen_at, seen = (await asyncio.wait_for(proc.stdout.readline(), 10)).split()
                if int(seen) == value:
                    break
            samples.append(float(seen_at) - t0)
            await asyncio.sleep(0.002)  # let the follower's loop go idle between changes
        proc.kill()
        await proc.wait()
    return _summary_ms(samples)


async def _must_park_ns(url: str, calls: int) -> dict[str, float]:
    async with RedisWindow(url, batch_id=f"bench-{uuid.uuid4().hex[:8]}", initial_limit=64) as w:
        permits = [await w.acquire(f"a{i}") for i in range(64)]
        clock = time.perf_counter_ns
        samples = []
        for i in range(calls):
            p = permits[i % 64]
            t0 = clock()
            w.must_park(p)
            samples.append(clock() - t0)
        samples.sort()
    return {"p50_ns": samples[len(samples) // 2], "p99_ns": samples[int(0.99 * len(samples))]}


async def _run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    return {
        "acquire_release": await _latency(url, args.ops),
        "throughput_uncontended": await _throughput(
            url, args.concurrency, args.seconds, args.concurrency
        ),
        "throughput_contended": await _throughput(
            url, args.concurrency, args.seconds, max(1, args.concurrency // 4)
        ),
        "propagation_to_follower": await _propagation(url, args.changes),
        "must_park": await _must_park_ns(url, 100_000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="an existing Redis (default: start one)")
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--follower", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follower is not None:
        asyncio.run(_follower(args.url, args.follower))
        return
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            url = stack.enter_context(RedisServer()).url
        version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.split(" ")[2]
        result = {
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
            "python": platform.python_version(),
            "redis": version,
            **asyncio.run(_run(args, url)),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

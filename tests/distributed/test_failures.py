"""Failure behaviour with real worker processes sharing one window on a real redis-server.

Each test starts ``_worker.py`` processes (the real Gate on a RedisWindow), breaks something
(SIGKILL a holder, SIGKILL the leader, restart Redis, SIGSTOP a holder past its lease) and
checks that the batch completes with the invariant held: at every LLM-call start, the calls in
flight across all workers never exceed the window (an atomic probe in Redis, see _worker.py).

Cross-process observation polls Redis or the workers' event streams with short sleeps and a
deadline; nothing sleeps a fixed time to wait for something.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from redis_support import Worker, eventually

from concur_langgraph.distributed.redis_window import batch_key
from concur_langgraph.testing.redis_server import RedisServer

TTL = 1.0
HB = 0.2
# Process start-up (Python + imports) on a loaded 2-core CI box can take seconds: deadlines for
# "worker is up" are generous; they bound a hang, they do not measure speed.
STARTUP_S = 30.0


@pytest.fixture
async def spawn() -> AsyncIterator[Any]:
    workers: list[Worker] = []

    async def start(name: str, *args: str) -> Worker:
        worker = await Worker(name, list(args)).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc is not None and worker.proc.returncode is None:
            worker.signal(signal.SIGCONT)
        await worker.kill()


async def zcard(client: Any, batch: str, name: str) -> int:
    return int(await client.zcard(batch_key(batch, name)))


def common(url: str, batch: str, limit: int) -> list[str]:
    return ["--url", url, "--batch", batch, "--limit", str(limit), "--ttl", str(TTL),
            "--hb", str(HB)]  # fmt: skip


async def wait_redis(pred: Any, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def finished(worker: Worker) -> dict[str, Any]:
    fin = worker.last("finished")
    assert fin is not None, f"worker {worker.name} did not finish: {worker.stderr.decode()[-2000:]}"
    return fin


async def test_sigkilled_holder_returns_its_slots_within_the_lease(
    redis_url: str, batch_id: str, spawn: Any
) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        holder = await spawn("A", *common(redis_url, batch_id, 4), "--agents", "4", "--hold")
        await wait_redis(
            lambda: _eq(zcard(client, batch_id, "holders"), 4),
            timeout_s=STARTUP_S,
            what="A holding the 4 slots",
        )
        others = await spawn("B", *common(redis_url, batch_id, 4), "--agents", "8", "--steps", "3")
        await wait_redis(
            lambda: _eq(zcard(client, batch_id, "wait:n"), 8),
            timeout_s=STARTUP_S,
            what="B's 8 agents queued",
        )
        holder.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_redis(
            lambda: _lt(zcard(client, batch_id, "wait:n"), 8),
            timeout_s=10 * TTL,
            what="A's slots to return",
        )
        returned_after = time.monotonic() - killed_at
        print(f"A's slots returned {returned_after:.3f} s after SIGKILL (TTL {TTL}, HB {HB})")
        assert await others.wait() == 0, others.stderr.decode()[-2000:]
        fin = finished(others)
        assert others.count("done") == 8
        assert fin["violations"] == 0
        # Bounded above by the wait's deadline (a loaded box can delay the reaper's heartbeat,
        # so no tighter wall-clock bound is asserted), and never before the lease could have
        # lapsed: A renewed at most one heartbeat before it died.
        assert returned_after >= TTL - HB - 0.05, f"slots returned after {returned_after:.2f} s"
        assert await zcard(client, batch_id, "holders") == 0
    finally:
        await client.aclose()


async def test_leader_killed_follower_takes_over_from_the_stored_window(
    redis_url: str, batch_id: str, spawn: Any
) -> None:
    client = redis_asyncio.Redis.from_url(redis_url, decode_responses=True)
    args = [*common(redis_url, batch_id, 3), "--agents", "0", "--leader", "--leader-ttl",
            str(TTL), "--max-limit", "8"]  # fmt: skip
    try:
        workers = [await spawn(name, *args) for name in ("L1", "L2", "L3")]
        await eventually(
            lambda: any(w.count("set") >= 3 for w in workers),
            timeout_s=STARTUP_S,
            what="a leader driving the window",
        )
        leaders = [w for w in workers if w.count("leader")]
        assert len(leaders) == 1, "two leaders at once"
        old = leaders[0]
        old.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await old.kill()
        stored = int(await client.get(batch_key(batch_id, "limit")))
        followers = [w for w in workers if w is not old]
        await eventually(
            lambda: any(w.count("leader") for w in followers),
            timeout_s=10 * TTL,
            what="a follower taking over",
        )
        took_over_after = time.monotonic() - killed_at
        print(f"follower took over {took_over_after:.3f} s after SIGKILL (lease {TTL})")
        new = [w for w in followers if w.count("leader")]
        assert len(new) == 1, "two followers took over"
        reign = new[0].last("leader")
        assert reign is not None
        old_reign = old.last("leader")
        assert old_reign is not None
        assert reign["epoch"] > old_reign["epoch"]
        assert reign["start"] == stored  # continues from the stored window
        await eventually(lambda: new[0].count("set") >= 3, what="the new leader moving the window")
        assert int(await client.get(batch_key(batch_id, "limit"))) != stored or (
            new[0].count("set") >= 8  # a full cycle of 1..8 came back to the same value
        )
        # Not before the dead leader's lease could have lapsed (it renewed at most one campaign
        # period before dying); bounded above by the wait's deadline.
        assert took_over_after >= TTL - TTL / 3 - 0.05, f"takeover after {took_over_after:.2f} s"
    finally:
        await client.aclose()


@pytest.mark.parametrize("persistence", ["none", "aof"])
async def test_redis_restarted_mid_batch_workers_reconnect_and_finish(
    persistence: str, batch_id: str, spawn: Any
) -> None:
    with RedisServer(persistence=persistence) as server:  # type: ignore[arg-type]
        args = [*common(server.url, batch_id, 3), "--agents", "8", "--steps", "12",
                "--call-s", "0.03", "--tool-s", "0.02"]  # fmt: skip
        workers = [await spawn(name, *args) for name in ("R1", "R2")]
        await eventually(
            lambda: sum(w.count("done") for w in workers) >= 1,
            timeout_s=STARTUP_S,
            what="the batch under way",
        )
        server.restart(kill=True)
        for w in workers:
            assert await w.wait(timeout_s=60) == 0, w.stderr.decode()[-2000:]
        assert sum(w.count("done") for w in workers) == 16
        assert all(finished(w)["violations"] == 0 for w in workers)
        logs = b"".join(w.stderr for w in workers).decode()
        if persistence == "none":
            # The batch's keys were lost: every worker re-registered what it held and awaited.
            assert "re-registered" in logs
        else:
            assert "re-registered" not in logs


async def test_sigstopped_holder_learns_it_lost_its_lease_and_requeues(
    redis_url: str, batch_id: str, spawn: Any, tmp_path: Any
) -> None:
    go = tmp_path / "go"
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        paused = await spawn(
            "S", *common(redis_url, batch_id, 2), "--agents", "2", "--steps", "6",
            "--call-s", "0.05", "--tool-s", "0.05", "--wait-file", str(go),
        )  # fmt: skip
        await wait_redis(
            lambda: _eq(zcard(client, batch_id, "holders"), 2),
            timeout_s=STARTUP_S,
            what="S holding both slots",
        )
        others = await spawn("T", *common(redis_url, batch_id, 2), "--agents", "4", "--steps", "3")
        await wait_redis(
            lambda: _eq(zcard(client, batch_id, "wait:n"), 4),
            timeout_s=STARTUP_S,
            what="T's agents queued",
        )
        paused.signal(signal.SIGSTOP)
        # While S sleeps, its leases lapse and T's agents run on the reclaimed slots.
        assert await others.wait(timeout_s=10 * TTL + STARTUP_S) == 0, others.stderr.decode()
        assert others.count("done") == 4
        paused.signal(signal.SIGCONT)
        go.touch()  # S's agents take their next step: that is where they learn of the loss
        assert await paused.wait() == 0, paused.stderr.decode()[-2000:]
        fin = finished(paused)
        assert paused.count("done") == 2
        assert fin["requeues"] >= 2  # both agents came back as parked agents
        assert fin["violations"] == 0 and finished(others)["violations"] == 0
        assert "lost its slot lease" in paused.stderr.decode() or fin["parks"] >= 2
    finally:
        await client.aclose()


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def _lt(value: Any, bound: int) -> bool:
    return bool(await value < bound)

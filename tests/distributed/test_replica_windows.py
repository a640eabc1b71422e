"""Several replicas on Redis: one shared window per replica, shared placements, shared deaths.

Workers are sessions of one batch in this process, each with its own ReplicaGate, on a real
Redis; the replicas are two served simulators (their ``/metrics`` feed each replica's leader).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from concur_langgraph import ConcurSession, FixedLaw
from concur_langgraph.core.replicas import ReplicaGate
from concur_langgraph.errors import ConfigError
from concur_langgraph.testing.sim_process import served_simulator

INTERVAL_S = 0.1
DEADLINE_S = 15.0  # a bound on a hang, not a measurement


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[str]]:
    with (
        served_simulator("--preset", "test-tiny") as first,
        served_simulator("--preset", "test-tiny") as second,
    ):
        yield [first.url, second.url]


def worker(redis_url: str, batch_id: str, urls: list[str], k: int = 1) -> ConcurSession:
    return ConcurSession(
        vllm_url=urls,
        law=FixedLaw(k),
        redis_url=redis_url,
        batch_id=batch_id,
        interval_s=INTERVAL_S,
    )


def gate_of(session: ConcurSession) -> ReplicaGate:
    assert isinstance(session.gate, ReplicaGate)
    return session.gate


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_workers_share_each_replicas_window_and_place_into_the_room_of_any(
    redis_url: str, replicas: list[str]
) -> None:
    batch = f"rep-{uuid.uuid4().hex[:8]}"
    async with worker(redis_url, batch, replicas) as a, worker(redis_url, batch, replicas) as b:
        ga, gb = gate_of(a), gate_of(b)
        await ga.before_llm_call("a1")
        assert ga.replica_of("a1") == 0
        # B sees replica 0's shared window full (a1 holds its one slot): b1 goes to replica 1.
        await until(lambda: gb.gates[0].window.statistics().holders == 1, "B to see a1")
        await gb.before_llm_call("b1")
        assert gb.replica_of("b1") == 1
        # No room anywhere: b2 waits for a replica, and gets replica 0 when A's agent ends
        # (B learns of the room from Redis, not from an event of its own).
        b2 = asyncio.create_task(gb.before_llm_call("b2"))
        # real-time ok: a real Redis; five poll periods in which nothing may place b2 (a
        # negative check: a slow machine only makes it stricter).
        await asyncio.sleep(5 * INTERVAL_S)
        assert not b2.done()
        await ga.release("a1")
        await asyncio.wait_for(b2, DEADLINE_S)
        assert gb.replica_of("b2") == 0
        stats = b.statistics()
        assert [r.gate.window.limit for r in stats.replicas] == [1, 1]
        assert sum(r.leader is True for r in a.statistics().replicas + stats.replicas) == 2
        await gb.release("b1")
        await gb.release("b2")


async def test_an_agent_resumed_by_another_worker_goes_back_to_its_replica(
    redis_url: str, replicas: list[str]
) -> None:
    batch = f"rep-{uuid.uuid4().hex[:8]}"
    async with worker(redis_url, batch, replicas, k=4) as a:
        ga = gate_of(a)
        await ga.before_llm_call("first")
        await ga.before_llm_call("x")
        assert ga.replica_of("x") == 1
        # The worker dies with x unfinished: its placement stays in Redis (its slot's lease
        # lapses with the worker; here the session ends without x's run ending).
    async with worker(redis_url, batch, replicas, k=4) as c:
        gc = gate_of(c)
        await gc.before_llm_call("x")
        assert gc.replica_of("x") == 1  # though replica 0 has more room now
        account = next(x for x in gc.gates[1].accounting() if x.agent_id == "x")
        assert account.state == "active"
        assert c.statistics().replicas[1].gate.window.admitted_total >= 1
        await gc.release("x")


async def test_a_replica_one_worker_finds_dead_is_dead_for_every_worker(
    redis_url: str, replicas: list[str]
) -> None:
    batch = f"rep-{uuid.uuid4().hex[:8]}"
    async with (
        worker(redis_url, batch, replicas, k=2) as a,
        worker(redis_url, batch, replicas, k=2) as b,
    ):
        ga, gb = gate_of(a), gate_of(b)
        await gb.before_llm_call("b1")
        await gb.before_llm_call("b2")
        assert {gb.replica_of("b1"), gb.replica_of("b2")} == {0, 1}
        on_1 = "b1" if gb.replica_of("b1") == 1 else "b2"
        await ga.mark_dead(1, reason="test")
        await until(lambda: not gb.alive(1), "B to learn that replica 1 is dead")
        await gb.before_llm_call(on_1)
        assert gb.replica_of(on_1) == 0
        assert [r.alive for r in b.statistics().replicas] == [True, False]


async def test_workers_that_list_other_replicas_are_refused(
    redis_url: str, replicas: list[str]
) -> None:
    batch = f"rep-{uuid.uuid4().hex[:8]}"
    async with worker(redis_url, batch, replicas):
        with pytest.raises(ConfigError, match=r"^vllm_url: batch .* runs on the replicas"):
            async with worker(redis_url, batch, replicas[::-1]):
                pass

"""Replica benchmarks: each baseline's placement exactly, sticky across steps; complete records.

The placements are checked twice: on their own (a fake cluster whose requests stay in flight
until the test lets them go, so least-requests sees the counts it must), and inside a real run
of LangGraph agents on a two-replica simulator in virtual time.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.runnables.config import var_child_runnable_config

from concur_langgraph import ConfigError
from concur_langgraph.bench._replicas import (
    BASELINES,
    OURS,
    VIRTUAL_NODES,
    ConsistentHash,
    LeastRequests,
    RoundRobin,
    calling_agent,
    make_placement,
    plot_replicas,
    replica_table,
    run_replicas,
    scaled,
)
from concur_langgraph.bench._runner import RECORD_KEYS
from concur_langgraph.bench._workload import Workload
from concur_langgraph.vtime import run as vrun

HOSTS = ("replica-0.concur-sim", "replica-1.concur-sim", "replica-2.concur-sim")
# Six agents of 2-4 steps on cpu-tiny replicas (a 4096-token cache each): runs in a second.
TINY: dict[str, Any] = {
    "name": "tiny",
    "agents": 6,
    "seed": 3,
    "system_prompt_tokens": 16,
    "task_prompt_tokens": {"uniform": [8, 20]},
    "steps": {"uniform": [2, 4]},
    "output_tokens": {"uniform": [5, 15]},
    "observation_tokens": {"uniform": [10, 30]},
    "tool_latency_s": {"uniform": [0.5, 1.5]},
}


class _Held(httpx.AsyncBaseTransport):
    """Answers 200 to each request once the test releases it; records the host it reached."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.release: dict[str, asyncio.Event] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        agent = calling_agent()
        assert agent is not None
        gate = self.release.setdefault(agent, asyncio.Event())
        await gate.wait()
        return httpx.Response(200, json={"host": request.url.host, "agent": agent})


async def _call(client: httpx.AsyncClient, agent: str) -> str:
    var_child_runnable_config.set({"configurable": {"thread_id": agent}})
    response = await client.get("http://replica-0.concur-sim/v1/models")
    await response.aread()
    host: str = response.json()["host"]
    return host


def _ring_owner(agent: str, hosts: tuple[str, ...]) -> int:
    # An independent statement of the ring: 100 SHA-256 points per replica, first at or after.
    def point(key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")

    ring = sorted((point(f"{h}#{v}"), i) for i, h in enumerate(hosts) for v in range(100))
    key = point(agent)
    for p, owner in ring:
        if p >= key:
            return owner
    return ring[0][1]


def test_calling_agent_reads_the_langgraph_thread_id() -> None:
    async def main() -> tuple[str | None, str | None]:
        outside = calling_agent()
        var_child_runnable_config.set({"configurable": {"thread_id": 7}})
        return outside, calling_agent()

    assert vrun(main()) == (None, "7")


def test_round_robin_places_in_first_call_order_and_sticks() -> None:
    async def main() -> tuple[list[str], dict[str, int], list[str]]:
        inner = _Held()
        placement = RoundRobin(inner, HOSTS)
        async with httpx.AsyncClient(transport=placement) as client:
            agents = ["c", "a", "d", "b", "e"]
            tasks = [asyncio.create_task(_call(client, a)) for a in agents]
            await asyncio.sleep(0)
            for event in inner.release.values():
                event.set()
            first = await asyncio.gather(*tasks)
            # Second step, in another order: each agent stays where it was.
            again = [await _call(client, a) for a in reversed(agents)]
            return first + again, dict(placement.placement), inner.hosts

    hosts, placed, _ = vrun(main())
    assert placed == {"c": 0, "a": 1, "d": 2, "b": 0, "e": 1}
    assert list(placed) == ["c", "a", "d", "b", "e"]  # first-call order
    expected = [HOSTS[placed[a]] for a in ["c", "a", "d", "b", "e"]]
    assert hosts[:5] == expected
    assert hosts[5:] == list(reversed(expected))


def test_consistent_hash_follows_the_ring_whatever_the_order() -> None:
    agents = [f"agent-{i:04d}" for i in range(40)]

    async def main(order: list[str]) -> dict[str, int]:
        inner = _Held()
        placement = ConsistentHash(inner, HOSTS)
        async with httpx.AsyncClient(transport=placement) as client:
            for agent in order:
                inner.release.setdefault(agent, asyncio.Event()).set()
                assert await _call(client, agent) == HOSTS[placement.placement[agent]]
                assert await _call(client, agent) == HOSTS[placement.placement[agent]]
        return placement.placement

    forward = vrun(main(agents))
    backward = vrun(main(list(reversed(agents))))
    assert forward == backward == {a: _ring_owner(a, HOSTS) for a in agents}
    assert VIRTUAL_NODES == 100
    assert len(set(forward.values())) == 3  # 40 agents reach every replica


def test_least_requests_picks_the_replica_with_fewest_in_flight_and_sticks() -> None:
    async def main() -> tuple[dict[str, int], list[list[int]]]:
        inner = _Held()
        placement = LeastRequests(inner, HOSTS)
        counts: list[list[int]] = []
        async with httpx.AsyncClient(transport=placement) as client:
            a = asyncio.create_task(_call(client, "a"))  # -> 0 (all idle; lowest index)
            await asyncio.sleep(0)
            b = asyncio.create_task(_call(client, "b"))  # -> 1
            await asyncio.sleep(0)
            counts.append(list(placement.in_flight))
            inner.release["a"].set()
            await a
            counts.append(list(placement.in_flight))
            c = asyncio.create_task(_call(client, "c"))  # 0 and 2 idle -> 0
            await asyncio.sleep(0)
            d = asyncio.create_task(_call(client, "d"))  # -> 2
            await asyncio.sleep(0)
            e = asyncio.create_task(_call(client, "e"))  # 1/1/1 -> 0
            await asyncio.sleep(0)
            counts.append(list(placement.in_flight))
            # a's second call goes back to 0 although 0 is now the busiest.
            inner.release["a"] = asyncio.Event()
            a2 = asyncio.create_task(_call(client, "a"))
            await asyncio.sleep(0)
            counts.append(list(placement.in_flight))
            for event in inner.release.values():
                event.set()
            await asyncio.gather(b, c, d, e, a2)
            counts.append(list(placement.in_flight))
        return dict(placement.placement), counts

    placed, counts = vrun(main())
    assert placed == {"a": 0, "b": 1, "c": 0, "d": 2, "e": 0}
    assert counts == [[1, 1, 0], [0, 1, 0], [2, 1, 1], [3, 1, 1], [0, 0, 0]]


def test_requests_outside_an_agent_pass_through() -> None:
    async def main() -> str:
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.host)
            return httpx.Response(200)

        placement = RoundRobin(httpx.MockTransport(handler), HOSTS)
        async with httpx.AsyncClient(transport=placement) as client:
            await client.get("http://replica-2.concur-sim/metrics")
        assert placement.placement == {}
        return seen[0]

    assert vrun(main()) == "replica-2.concur-sim"


def test_unknown_placement_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="round-robin"):
        make_placement("random", httpx.MockTransport(lambda r: httpx.Response(200)), HOSTS)


# -- whole runs: LangGraph agents on two simulated replicas ---------------------------------
@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    work = Workload.from_dict(TINY, source="tiny")
    return {p: run_replicas(work, p, "cpu-tiny", 2) for p in BASELINES}


def test_a_run_record_is_complete(runs: dict[str, dict[str, Any]]) -> None:
    plans = Workload.from_dict(TINY, source="tiny").plans()
    for policy, record in runs.items():
        assert set(RECORD_KEYS) <= set(record)
        assert record["policy"] == policy and record["replicas"] == 2
        assert record["backend"] == "sim:cpu-tinyx2"
        assert record["status"] == "ok" and record["agents_ok"] == 6 and record["errors"] == []
        assert record["llm_calls"] == sum(p.steps for p in plans)
        assert record["generated_tokens"] == sum(sum(p.output_tokens) for p in plans)
        per = record["per_replica"]
        assert len(per) == 2
        assert sum(p["agents"] for p in per) == 6
        assert sum(p["llm_calls"] for p in per) == record["llm_calls"]
        assert sum(p["prompt_tokens_computed"] for p in per) == record["prompt_tokens_computed"]
        assert sum(p["preemptions"] for p in per) == record["preemptions"]
        assert max(p["finish_s"] for p in per) == pytest.approx(record["makespan_s"], abs=1e-6)
        assert record["moves"] == 0
        assert record["prompt_tokens_computed"] > 0 and 0 < record["prefix_hit_rate"] < 1
        assert len(record["series"]["kv_usage"][0]) == 2


def test_agents_are_placed_exactly_and_stick_across_steps(
    runs: dict[str, dict[str, Any]],
) -> None:
    agents = [f"agent-{i:04d}" for i in range(6)]
    hosts = ("replica-0.concur-sim", "replica-1.concur-sim")
    chash = runs["consistent-hash"]["placement"]
    assert chash == {a: _ring_owner(a, hosts) for a in agents}
    # The batch starts at once: agents call in index order, so round-robin alternates, and
    # least-requests does too (each first call is still in flight when the next is placed).
    alternate = {a: i % 2 for i, a in enumerate(agents)}
    assert runs["round-robin"]["placement"] == alternate
    assert runs["least-requests"]["placement"] == alternate
    for record in runs.values():
        # Every call of an agent reached one replica (moves == 0) and the counts add up.
        placed = record["placement"]
        assert [p["agents"] for p in record["per_replica"]] == [
            sum(1 for r in placed.values() if r == i) for i in range(2)
        ]


def test_table_and_plot(runs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    table = replica_table(list(runs.values()))
    assert table.count("\n") == 2 + len(runs)
    assert "| tiny | 2 | 6 | consistent-hash |" in table
    (path,) = plot_replicas(list(runs.values()), tmp_path)
    assert path.name == "replicas__tiny.png" and path.stat().st_size > 0


def test_ours_places_every_agent_on_one_replica() -> None:
    work = Workload.from_dict(TINY, source="tiny")
    record = run_replicas(work, OURS, "cpu-tiny", 2)
    assert record["status"] == "ok" and record["moves"] == 0
    assert sorted(set(record["placement"].values())) == [0, 1]


def test_scaled_keeps_the_first_plans_and_the_name() -> None:
    work = Workload.from_dict(TINY, source="tiny")
    big = scaled(work, 3)
    assert big.agents == 18 and big.name == "tiny"
    assert big.plans()[:6] == work.plans()
    with pytest.raises(ConfigError, match="factor"):
        scaled(work, 0)

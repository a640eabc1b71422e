"""A batch on several simulated replicas: each agent sticky to one, calls routed there through
every way in, a replica that dies mid-batch, and a router in front (one window).

Virtual time: the whole client stack (LangGraph, ChatOpenAI, the openai SDK, httpx) runs
against a :class:`SimCluster` whose replicas are separate engines with their own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurGate,
    ConcurMiddleware,
    FixedLaw,
    SessionOptions,
    gate_node,
    routed_http_client,
)
from concur_langgraph.errors import ConfigError
from concur_langgraph.integrations.transport import current_agent_id
from concur_langgraph.session.exporter import SessionCollector
from concur_langgraph.sim import SimCluster, SimServer
from concur_langgraph.testing.agent_loop import LoopState, loop_tasks, observation_loop
from concur_langgraph.testing.vtime_fixtures import virtual_time

AGENTS = 12
STEPS = 3


class Recording(httpx.AsyncBaseTransport):
    """Records which replica each agent's chat requests reached, and their ``priority``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.hosts: dict[str, list[str]] = defaultdict(list)
        self.priority: dict[str, list[object]] = defaultdict(list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            agent = current_agent_id() or "?"
            self.hosts[agent].append(request.url.host)
            self.priority[agent].append(json.loads(request.read()).get("priority"))
        return await self.inner.handle_async_request(request)


def sticky_and_spread(hosts: dict[str, list[str]], replicas: int) -> dict[str, str]:
    """Each agent's one replica; checks every agent stayed on one and all replicas were used."""
    where = {}
    for agent, seen in hosts.items():
        assert len(set(seen)) == 1, f"agent {agent} went to {seen}"
        where[agent] = seen[0]
    assert len(set(where.values())) == replicas, where
    return where


@virtual_time
async def test_concur_gate_places_each_agent_on_one_replica_with_a_window_each() -> None:
    async with SimCluster("test-tiny", replicas=3) as cluster:
        recording = Recording(cluster.transport())
        model = cluster.chat_model(
            max_tokens=8, http_async_client=routed_http_client(transport=recording)
        )
        graph = observation_loop(model, steps=STEPS, tool_s=2.0)
        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                http_client=metrics,
                interval_s=0.5,
                progress=False,
            )
            results = await gate.abatch(loop_tasks(AGENTS))
        assert len(results) == AGENTS
        where = sticky_and_spread(recording.hosts, 3)
        assert len(where) == AGENTS
        stats = gate.statistics()
        assert stats.gate.completed == AGENTS and stats.controller is None
        assert [r.placed_total for r in stats.replicas] == [4, 4, 4]
        for replica in stats.replicas:
            assert replica.alive and replica.gate.completed == 4
            assert replica.controller is not None and replica.controller.ticks >= 1
            # Each replica's controller read its own engine: its capacity, its requests.
            assert replica.controller.last_sample is not None
        # The engines saw exactly their agents' calls: 4 agents x (STEPS + 1) calls each.
        for server in cluster.servers:
            assert sum(server.engine.metrics().request_success.values()) == 4 * (STEPS + 1)
        assert "replica 2 http://replica-2.concur-sim" in str(stats)
        # The Prometheus export shows every replica.
        families = {f.name: f for f in SessionCollector(lambda: stats).collect()}
        placed = {s.labels["replica"]: s.value for s in families["concur_replica_placed"].samples}
        assert placed == {url: 4 for url in cluster.root_urls}
        alive = [s.value for s in families["concur_replica_alive"].samples]
        assert alive == [1.0, 1.0, 1.0]
        assert len(families["concur_replica_kv_usage_ratio"].samples) == 3


@virtual_time
async def test_a_replica_that_dies_mid_batch_loses_nothing() -> None:
    async with SimCluster("test-tiny", replicas=3) as cluster:
        recording = Recording(cluster.transport())
        # The SDK's default retries: the call in flight on the dead replica is retried, and the
        # retry is routed to the agent's new replica.
        model = cluster.chat_model(
            max_tokens=8, max_retries=2, http_async_client=routed_http_client(transport=recording)
        )
        graph = observation_loop(model, steps=4, tool_s=2.0)

        async def kill_replica_1() -> None:
            await asyncio.sleep(5.0)
            cluster.kill(1)

        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                http_client=metrics,
                interval_s=0.5,
                progress=False,
            )
            killer = asyncio.create_task(kill_replica_1())
            results = await gate.abatch(loop_tasks(AGENTS))
            await killer
        # Every agent finished every step: 1 task + 4 x (answer, observation) + the last answer.
        assert all(len(r["messages"]) == 1 + 2 * 4 + 1 for r in results)
        stats = gate.statistics()
        assert [r.alive for r in stats.replicas] == [True, False, True]
        assert stats.gate.completed == AGENTS
        moved = [a for a, seen in recording.hosts.items() if "replica-1.concur-sim" in seen]
        assert moved, "no agent was on replica 1"
        for agent in moved:
            seen = recording.hosts[agent]
            first_elsewhere = next(i for i, h in enumerate(seen) if h != "replica-1.concur-sim")
            # Once moved, an agent never goes back, and it stays on its new replica.
            assert set(seen[first_elsewhere:]) == {seen[-1]} != {"replica-1.concur-sim"}
        assert stats.replicas[1].controller is not None  # its last state, kept


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return f"result for {query}"


@virtual_time
@pytest.mark.parametrize("way", ["handler", "middleware", "node"])
async def test_every_way_in_routes_its_agents_to_their_replicas(way: str) -> None:
    async with SimCluster("test-tiny", replicas=2) as cluster:
        recording = Recording(cluster.transport())
        model = cluster.chat_model(
            max_tokens=8, http_async_client=routed_http_client(transport=recording)
        )
        options: dict[str, Any] = {"law": FixedLaw(3), "vllm_url": cluster.root_urls}
        async with cluster.http_client() as metrics:
            options["http_client"] = metrics
            if way == "handler":
                graph = observation_loop(model, steps=STEPS, tool_s=2.0)
                async with ConcurCallbackHandler(**options) as handler:
                    results = await graph.abatch(
                        loop_tasks(6),
                        [
                            {"callbacks": [handler], "configurable": {"thread_id": f"t{i}"}}
                            for i in range(6)
                        ],
                    )
                    stats = handler.statistics()
            elif way == "middleware":
                # No thread id: the middleware's own agent identity is what routes.
                middleware = ConcurMiddleware(**options)
                agent = create_agent(model, [lookup], middleware=[middleware])
                async with middleware:
                    results = await agent.abatch(
                        [{"messages": [HumanMessage(f"question {i}")]} for i in range(6)]
                    )
                    stats = middleware.statistics()
            else:

                async def llm(state: LoopState) -> dict[str, Any]:
                    return {"messages": [await model.ainvoke(state["messages"])]}

                builder = StateGraph(LoopState)
                builder.add_node("admit", gate_node())
                builder.add_node("llm", llm)
                builder.add_edge(START, "admit")
                builder.add_edge("admit", "llm")
                builder.add_edge("llm", END)
                async with ConcurGate(builder.compile(), progress=False, **options) as gate:
                    results = await gate.abatch(loop_tasks(6))
                    stats = gate.statistics()
        assert len(results) == 6
        where = sticky_and_spread(recording.hosts, 2)
        assert len(where) == 6 and "?" not in where
        assert [r.placed_total for r in stats.replicas] == [3, 3]
        # FixedLaw(3) is per replica: 3 agents each, never more.
        assert all(r.gate.window.limit == 3 for r in stats.replicas)


@virtual_time
async def test_behind_a_router_the_gate_holds_one_window_over_the_folded_replicas() -> None:
    async with SimCluster("test-tiny", replicas=2) as cluster:
        recording = Recording(cluster.transport())
        # The "router": the model's calls all go to replica 0's address; the gate only reads
        # the replicas' /metrics and holds one window.
        model = cluster.chat_model(
            max_tokens=8, http_async_client=httpx.AsyncClient(transport=recording)
        )
        graph = observation_loop(model, steps=STEPS, tool_s=2.0)
        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                router=True,
                http_client=metrics,
                law=FixedLaw(2),
                progress=False,
            )
            async with gate:
                task = asyncio.create_task(gate.abatch(loop_tasks(6)))
                peak = 0
                while not task.done():
                    peak = max(peak, gate.statistics().gate.window.holders)
                    await asyncio.sleep(0.25)
                await task
                stats = gate.statistics()
        assert stats.replicas == () and stats.gate.window.limit == 2 and peak == 2
        assert stats.controller is not None and stats.controller.last_sample is not None
        assert {h for seen in recording.hosts.values() for h in seen} == {"replica-0.concur-sim"}


@virtual_time
async def test_several_replicas_without_the_routing_client_warn_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with SimCluster("test-tiny", replicas=2) as cluster:
        model = cluster.chat_model(max_tokens=8)  # the plain client: no routing
        graph = observation_loop(model, steps=1, tool_s=1.0)
        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                http_client=metrics,
                law=FixedLaw(2),
                progress=False,
            )
            with caplog.at_level(logging.WARNING, logger="concur_langgraph"):
                await gate.abatch(loop_tasks(4))
    warnings = [r for r in caplog.records if "routing transport" in r.getMessage()]
    assert len(warnings) == 1
    assert "routed_http_client()" in warnings[0].getMessage()
    assert "router=True" in warnings[0].getMessage()


def test_options_name_what_cannot_serve_several_replicas() -> None:
    urls = ["http://a:1", "http://b:2"]
    assert SessionOptions(vllm_url=urls).replicated
    assert not SessionOptions(vllm_url=urls, router=True).replicated
    assert not SessionOptions(vllm_url=urls[0]).replicated
    with pytest.raises(ConfigError, match=r"^router: must be True or False"):
        SessionOptions(vllm_url=urls, router="yes")  # type: ignore[arg-type]
    assert SessionOptions(vllm_url=urls, redis_url="redis://h:1", batch_id="b").replicated
    from concur_langgraph import LocalWindow

    with pytest.raises(ConfigError, match=r"^window: one window instance cannot serve the 2"):
        SessionOptions(vllm_url=urls, window=LocalWindow(2))
    SessionOptions(vllm_url=urls, window=LocalWindow(2), router=True)


@virtual_time
async def test_the_progress_line_summary_and_plot_show_every_replica(tmp_path: Path) -> None:
    from concur_langgraph.integrations.progress import BatchProgress

    async with SimCluster("test-tiny", replicas=2) as cluster:
        model = cluster.chat_model(
            max_tokens=8, http_async_client=routed_http_client(transport=cluster.transport())
        )
        graph = observation_loop(model, steps=1, tool_s=1.0)
        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                http_client=metrics,
                law=FixedLaw(2),
                progress=False,
            )
            async with gate:
                session = gate.session
                assert session is not None
                await gate.abatch(loop_tasks(4))
                figure = gate.plot(tmp_path / "replicas.png")
                assert figure.stat().st_size > 10_000
                cluster.kill(1)
                await session.gate.mark_dead(1)  # type: ignore[union-attr]
                progress = BatchProgress(session, total=4, enabled=False)
                line = progress.render().plain
                summary = progress.render_summary(10.0)
    assert "r0 2 KV 0%, r1 dead" in line
    assert "replica 0: 2 agents placed, 0 parks" in summary
    assert "replica 1: 2 agents placed, 0 parks, died during the batch" in summary


@virtual_time
@pytest.mark.parametrize("hint", [True, False])
async def test_priority_hint_sends_each_agents_admission_rank(hint: bool) -> None:
    async with SimServer("test-tiny") as server:
        bodies = Recording(httpx.ASGITransport(app=server.app))
        model = server.chat_model(
            max_tokens=8, http_async_client=routed_http_client(transport=bodies)
        )
        graph = observation_loop(model, steps=2, tool_s=1.0)
        gate = ConcurGate(graph, law=FixedLaw(2), priority_hint=hint, progress=False)
        await gate.abatch(loop_tasks(4))
    assert len(bodies.priority) == 4
    ranks = {agent: set(seen) for agent, seen in bodies.priority.items()}
    if hint:
        # Two at a time, no parks: each agent keeps the rank of its one admission.
        assert sorted(r for seen in ranks.values() for r in seen) == [0, 1, 2, 3]  # type: ignore[type-var]
    else:
        assert all(seen == {None} for seen in ranks.values())


@virtual_time
async def test_priority_hint_on_replicas_ranks_agents_per_replica() -> None:
    async with SimCluster("test-tiny", replicas=2) as cluster:
        bodies = Recording(cluster.transport())
        model = cluster.chat_model(
            max_tokens=8, http_async_client=routed_http_client(transport=bodies)
        )
        graph = observation_loop(model, steps=1, tool_s=1.0)
        async with cluster.http_client() as metrics:
            gate = ConcurGate(
                graph,
                vllm_url=cluster.root_urls,
                http_client=metrics,
                law=FixedLaw(2),
                priority_hint=True,
                progress=False,
            )
            await gate.abatch(loop_tasks(4))
    # Each replica's window ranks its own agents: 0 and 1 on each.
    assert sorted(p for seen in bodies.priority.values() for p in set(seen)) == [0, 0, 1, 1]  # type: ignore[type-var]

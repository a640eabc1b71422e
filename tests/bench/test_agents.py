"""The benchmark agents: real ReAct graphs that follow their plans exactly on the simulator."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import AIMessage, SystemMessage, ToolMessage

from concur_langgraph import vtime
from concur_langgraph.bench._agents import (
    AgentTracker,
    agent_input,
    build_agent_graph,
    recursion_limit,
    system_prompt,
)
from concur_langgraph.bench._workload import Workload
from concur_langgraph.sim._server import SimServer


def _run(workload: Workload) -> tuple[list[Any], AgentTracker, float, Any]:
    async def main() -> tuple[list[Any], AgentTracker, float, Any]:
        server = SimServer("test-tiny")
        tracker = AgentTracker()
        graph = build_agent_graph(server.chat_model(max_retries=0), tracker)
        plans = workload.plans()
        system = system_prompt(workload)
        inputs = [agent_input(workload, p, system=system) for p in plans]
        configs: list[Any] = [{"recursion_limit": recursion_limit(p)} for p in plans]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await graph.abatch(inputs, configs)
        elapsed = loop.time() - t0
        metrics = server.engine.metrics()
        await server.engine.aclose()
        return results, tracker, elapsed, metrics

    return vtime.run(main())


def test_each_agent_runs_exactly_its_plan(tiny_workload: Workload) -> None:
    results, tracker, elapsed, metrics = _run(tiny_workload)
    plans = tiny_workload.plans()
    assert len(results) == len(plans)
    for plan, state in zip(plans, results, strict=True):
        messages = state["messages"]
        assert isinstance(messages[0], SystemMessage)
        assert len(str(messages[0].content).split()) == tiny_workload.system_prompt_tokens
        assert len(str(messages[1].content).split()) == plan.task_prompt_tokens
        replies = [m for m in messages if isinstance(m, AIMessage)]
        observations = [m for m in messages if isinstance(m, ToolMessage)]
        assert state["step"] == plan.steps
        assert len(replies) == plan.steps
        # Exactly the drawn output tokens per step: the simulator's words are its tokens.
        assert [len(str(m.content).split()) for m in replies] == list(plan.output_tokens)
        assert [m.usage_metadata["output_tokens"] for m in replies] == list(plan.output_tokens)
        assert [len(str(m.content).split()) for m in observations] == list(plan.observation_tokens)
        # Every step but the last "calls the tool"; the observation answers that call.
        assert all(len(m.tool_calls) == 1 for m in replies[:-1])
        assert replies[-1].tool_calls == []
        assert [m.tool_call_id for m in observations] == [
            m.tool_calls[0]["id"] for m in replies[:-1]
        ]
        # Tool latencies are real waits (virtual time): no agent beats its own tool time.
        assert elapsed >= sum(plan.tool_latency_s)
    total = sum(sum(p.output_tokens) for p in plans)
    assert tracker.generated_tokens == metrics.generation_tokens == total
    assert tracker.started == tracker.finished == len(plans)
    assert tracker.failed == tracker.active == 0
    assert tracker.llm_calls == sum(p.steps for p in plans)
    assert tracker.short_replies == 0


def test_agents_share_only_the_system_prompt(tiny_workload: Workload) -> None:
    plans = tiny_workload.plans()
    system = system_prompt(tiny_workload)
    first = agent_input(tiny_workload, plans[0], system=system)
    second = agent_input(tiny_workload, plans[1], system=system)
    assert first["messages"][0].content == second["messages"][0].content
    assert first["messages"][1].content != second["messages"][1].content
    # Rebuilding an agent's input gives the same text (deterministic words).
    assert (
        agent_input(tiny_workload, plans[0])["messages"][1].content == first["messages"][1].content
    )

"""The whole stack on the simulator in virtual time: ChatOpenAI -> openai SDK -> httpx on ASGI ->
simulated vLLM, with the gate checked from the server's side.

With ``tool_call_turns`` set the simulator answers bound tools with tool calls, so agents that
stop when the model stops calling tools (``create_agent``, ``ToolNode`` + ``tools_condition``)
run several steps through each way in."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from concur_langgraph import ConcurCallbackHandler, ConcurGate, FixedLaw, gate_node, vtime
from concur_langgraph.sim import SimServer, get_preset
from concur_langgraph.testing.agent_loop import loop_tasks, observation_loop

STEPS = 3
TOOL_TURNS = (1, 3)
"""Tool-calling turns per agent (``SimConfig.tool_call_turns``)."""


def test_fixed_window_seen_from_the_simulator() -> None:
    async def main() -> tuple[list[Any], int, Any]:
        async with SimServer("test-tiny") as server:
            model = server.chat_model(max_tokens=8)
            gate = ConcurGate(observation_loop(model, steps=STEPS), law=FixedLaw(3))
            seen = 0
            done = asyncio.Event()

            async def watch() -> None:
                nonlocal seen
                while not done.is_set():
                    metrics = server.engine.metrics()
                    seen = max(seen, metrics.num_requests_running + metrics.num_requests_waiting)
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            try:
                results = await gate.abatch(loop_tasks(8))
            finally:
                done.set()
                await watcher
            return results, seen, gate.statistics()

    results, seen, stats = vtime.run(main())
    assert [r["messages"][0].content.split()[1] for r in results] == [str(i) for i in range(8)]
    assert all(len(r["messages"]) == 2 * STEPS + 2 for r in results)
    assert seen == 3  # the server never had more than the window's agents' requests
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 8)


def test_concur_law_driven_by_the_simulators_metrics() -> None:
    async def main() -> tuple[list[Any], Any]:
        async with SimServer("test-tiny") as server, server.http_client() as client:
            model = server.chat_model(max_tokens=8)
            gate = ConcurGate(
                observation_loop(model, steps=STEPS, tool_s=2.0),
                vllm_url=server.root_url,
                http_client=client,
                interval_s=0.5,
                initial_window=1,
            )
            results = await gate.abatch(loop_tasks(6))
            return results, gate.statistics()

    results, stats = vtime.run(main())
    assert len(results) == 6
    assert stats.controller is not None
    assert stats.controller.ticks >= 1 and stats.controller.errors == 0
    assert stats.controller.last_sample is not None
    # An empty cache at the start: Eq. 1 grows the window from 1.
    assert stats.controller.changes >= 1 and stats.gate.window.limit > 1
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 6)


# -- agents that stop when the model stops calling tools --------------------------------------
@tool
async def lookup(query: str) -> str:
    """Look something up."""
    await asyncio.sleep(1.0)
    return f"nothing found for {query}"


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    await asyncio.sleep(0.5)
    return a + b


def tool_server() -> SimServer:
    return SimServer(dataclasses.replace(get_preset("test-tiny"), tool_call_turns=TOOL_TURNS))


def agent_inputs(n: int) -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"question {i}: what is new?")]} for i in range(n)]


def assert_tool_loops(results: list[Any], n: int) -> int:
    """Every agent called tools between 1 and 3 times, ran them, and ended on an answer;
    returns the LLM calls made."""
    assert len(results) == n
    calls = 0
    names: set[str] = set()
    for result in results:
        messages = result["messages"]
        answers = [m for m in messages if isinstance(m, AIMessage)]
        observations = [m for m in messages if isinstance(m, ToolMessage)]
        assert TOOL_TURNS[0] + 1 <= len(answers) <= TOOL_TURNS[1] + 1
        assert all(a.tool_calls for a in answers[:-1]) and answers[-1].tool_calls == []
        assert answers[-1].response_metadata["finish_reason"] == "length"
        assert len(observations) == len(answers) - 1
        for observation in observations:
            assert observation.status == "success"
            # Arguments from the tools' schemas: strings "<name>-<turn>", integers 1.
            assert observation.content == "2" or str(observation.content).startswith(
                "nothing found for query-"
            )
            names.add(str(observation.name))
        calls += len(answers)
    assert names == {"lookup", "add"}
    return calls


async def _gate(agent: Any, inputs: list[Any]) -> tuple[list[Any], int]:
    gate = ConcurGate(agent, law=FixedLaw(2))
    results = await gate.abatch(inputs)
    stats = gate.statistics().gate
    assert (stats.window.holders, stats.completed) == (0, len(inputs))
    return results, stats.llm_calls


async def _handler(agent: Any, inputs: list[Any]) -> tuple[list[Any], int]:
    async with ConcurCallbackHandler(law=FixedLaw(2)) as handler:
        results = await agent.abatch(inputs, config={"callbacks": [handler]})
        stats = handler.statistics().gate
    assert (stats.window.holders, stats.completed) == (0, len(inputs))
    return results, stats.llm_calls


@pytest.mark.parametrize("way", [_gate, _handler], ids=["concur-gate", "callback-handler"])
def test_create_agent_calls_tools_on_the_simulator_through_the_gate(
    way: Callable[[Any, list[Any]], Awaitable[tuple[list[Any], int]]],
) -> None:
    async def main() -> tuple[list[Any], int, int]:
        async with tool_server() as server:
            agent = create_agent(server.chat_model(max_tokens=16), [lookup, add])
            results, gated = await way(agent, agent_inputs(6))
            return results, gated, server.engine.metrics().num_requests_aborted

    results, gated, aborted = vtime.run(main())
    assert gated == assert_tool_loops(results, 6)
    assert aborted == 0


def test_a_gate_node_before_a_tool_calling_model_on_the_simulator() -> None:
    async def main() -> tuple[list[Any], int]:
        async with tool_server() as server:
            model = server.chat_model(max_tokens=16).bind_tools([lookup, add])

            async def llm(state: MessagesState) -> dict[str, Any]:
                return {"messages": [await model.ainvoke(state["messages"])]}

            builder = StateGraph(MessagesState)
            builder.add_node("admit", gate_node())
            builder.add_node("llm", llm)
            builder.add_node("tools", ToolNode([lookup, add]))
            builder.add_edge(START, "admit")
            builder.add_edge("admit", "llm")
            builder.add_conditional_edges("llm", tools_condition)
            builder.add_edge("tools", "admit")
            return await _gate(builder.compile(), agent_inputs(6))

    results, gated = vtime.run(main())
    # The node admits; llm_calls counts the model calls (which pass on the fast path) only.
    assert gated == assert_tool_loops(results, 6)

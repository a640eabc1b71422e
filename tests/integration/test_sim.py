"""The whole stack on the simulator in virtual time: ChatOpenAI -> openai SDK -> httpx on ASGI ->
simulated vLLM, with the gate checked from the server's side."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from concur_langgraph import vtime
from concur_langgraph._laws import FixedLaw
from concur_langgraph._wrapper import ConcurGate
from concur_langgraph.sim import SimServer

STEPS = 3


class LoopState(MessagesState):
    steps: int


def sim_agent_graph(model: Any, *, tool_s: float = 0.5) -> Any:
    """agent -> tool -> agent ... : STEPS tool calls (timed observations), then END."""

    async def agent(state: LoopState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def tool(state: LoopState) -> dict[str, Any]:
        await asyncio.sleep(tool_s)
        step = state.get("steps", 0) + 1
        return {"messages": [HumanMessage(f"observation {step}")], "steps": step}

    def route(state: LoopState) -> str:
        return "tool" if state.get("steps", 0) < STEPS else END

    builder = StateGraph(LoopState)
    builder.add_node("agent", agent)
    builder.add_node("tool", tool)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, {"tool": "tool", END: END})
    builder.add_edge("tool", "agent")
    return builder.compile()


def _tasks(count: int) -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"task {i} " + "context " * 20)]} for i in range(count)]


def test_fixed_window_seen_from_the_simulator() -> None:
    async def main() -> tuple[list[Any], int, Any]:
        async with SimServer("test-tiny") as server:
            model = server.chat_model(max_tokens=8)
            gate = ConcurGate(sim_agent_graph(model), law=FixedLaw(3))
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
                results = await gate.abatch(_tasks(8))
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
                sim_agent_graph(model, tool_s=2.0),
                vllm_url=server.root_url,
                http_client=client,
                interval_s=0.5,
                initial_window=1,
            )
            results = await gate.abatch(_tasks(6))
            return results, gate.statistics()

    results, stats = vtime.run(main())
    assert len(results) == 6
    assert stats.controller is not None
    assert stats.controller.ticks >= 1 and stats.controller.errors == 0
    assert stats.controller.last_sample is not None
    # An empty cache at the start: Eq. 1 grows the window from 1.
    assert stats.controller.changes >= 1 and stats.gate.window.limit > 1
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 6)

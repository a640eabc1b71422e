"""The gate node: admission in a super-step of its own, right after a checkpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _integration_support import (
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    tool_loop_graph,
    work_tool,
)
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurGate,
    ConfigError,
    FixedLaw,
    gate_node,
    vtime,
)

STEPS = 3


def test_gate_node_under_concur_gate_bounds_agents() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    graph = tool_loop_graph(model, [work_tool(tracker)], admit=gate_node())
    gate = ConcurGate(graph, law=FixedLaw(2))
    results = vtime.run(gate.abatch(inputs(5)))
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert tracker.max_active == 2
    stats = gate.statistics()
    assert stats is not None
    # The node admits, the LLM call after it passes on the fast path: llm_calls counts the
    # real calls only (it once counted the node's passes too, twice the calls).
    assert stats.gate.llm_calls == sum(len(calls) for calls in tracker.calls.values())
    assert stats.gate.llm_calls == 5 * (STEPS + 1)
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 5)


def test_an_agent_parked_in_the_gate_node_has_its_state_checkpointed_at_the_park_point() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    saver = InMemorySaver()
    graph = tool_loop_graph(model, [work_tool(tracker)], admit=gate_node(), checkpointer=saver)
    handler = ConcurCallbackHandler(law=FixedLaw(2))
    snapshots: dict[str, Any] = {}

    async def main() -> list[Any]:
        configs: list[RunnableConfig] = [
            {"callbacks": [handler], "configurable": {"thread_id": f"t{i}"}} for i in range(2)
        ]
        batch = asyncio.create_task(graph.abatch(inputs(2), configs))
        await asyncio.sleep(2.5)  # both agents inside their first tool call
        await handler.session.window.set_limit(1)
        await asyncio.sleep(2.0)  # tools end at 4.0; then t1 reaches "admit" and parks
        assert handler.statistics().gate.parked == 1
        for thread in ("t0", "t1"):
            snapshots[thread] = await graph.aget_state({"configurable": {"thread_id": thread}})
        return await batch

    results = vtime.run(main())
    # The most recently admitted agent (t1) parked in the admit node: the checkpoint before
    # that super-step holds its conversation up to the tool result, and "admit" is next.
    parked = snapshots["t1"]
    assert parked.next == ("admit",)
    assert isinstance(parked.values["messages"][-1], ToolMessage)
    assert parked.values["messages"][-1].content == "result of step 1 for agent-1"
    for result in results:
        assert_continuous(tracker, result, STEPS)
    stats = handler.statistics().gate
    assert stats.parks_total == 1
    assert (stats.window.holders, stats.completed) == (0, 2)


def test_gate_node_without_a_handler_says_what_is_missing() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)
    graph = tool_loop_graph(model, [work_tool(tracker)], admit=gate_node())
    with pytest.raises(ConfigError, match=r"^callbacks: the gate node found no ConcurCallback"):
        vtime.run(graph.ainvoke(inputs(1)[0]))

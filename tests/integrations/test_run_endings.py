"""Slots come back however a run ends: interrupt, drain, a bare model call; resume re-admits."""

from __future__ import annotations

import asyncio
from typing import Any

from _integration_support import (
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    tool_loop_graph,
    work_tool,
)
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import GraphDrained
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.runtime import RunControl
from langgraph.types import Command, interrupt

from concur_langgraph import ConcurCallbackHandler, ConcurGate, FixedLaw, vtime


def _approval_graph(model: ScriptedChatModel) -> Any:
    """llm -> human approval (interrupt) -> llm -> END."""

    async def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def approve(state: MessagesState) -> dict[str, Any]:
        answer = interrupt("approve?")
        return {"messages": [HumanMessage(f"approved: {answer}")]}

    def route(state: MessagesState) -> str:
        return "approve" if len(state["messages"]) < 3 else END

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_node("approve", approve)
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, {"approve": "approve", END: END})
    builder.add_edge("approve", "llm")
    return builder.compile(checkpointer=InMemorySaver())


def test_an_interrupted_agent_gives_its_slot_back_and_resumes_later() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=0)
    gate = ConcurGate(_approval_graph(model), law=FixedLaw(1))
    configs: list[RunnableConfig] = [{"configurable": {"thread_id": f"h{i}"}} for i in range(3)]

    async def main() -> tuple[list[Any], list[Any]]:
        paused = await gate.abatch(inputs(3), configs)
        stats = gate.statistics()
        assert stats is not None
        # With a window of 1, all three reached their interrupt: each released its slot there.
        assert (stats.gate.window.holders, stats.gate.completed, stats.gate.llm_calls) == (0, 3, 3)
        resumed = await gate.abatch([Command(resume="yes")] * 3, configs)
        return paused, resumed

    paused, resumed = vtime.run(main())
    assert all("__interrupt__" in out for out in paused)
    assert [out["messages"][-2].content for out in resumed] == ["approved: yes"] * 3
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.completed, stats.gate.llm_calls) == (0, 3, 3)


def test_a_drained_run_releases_its_slot_and_resumes_where_it_stopped() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=3)
    graph = tool_loop_graph(model, [work_tool(tracker)], checkpointer=InMemorySaver())
    handler = ConcurCallbackHandler(law=FixedLaw(1))
    config: RunnableConfig = {"callbacks": [handler], "configurable": {"thread_id": "d"}}
    control = RunControl()

    async def main() -> Any:
        async def drain_soon() -> None:
            await asyncio.sleep(2.0)  # inside the first tool call
            control.request_drain("maintenance")

        drainer = asyncio.create_task(drain_soon())
        try:
            await graph.ainvoke(inputs(1)[0], config, control=control)
        except GraphDrained:
            pass
        else:
            raise AssertionError("the run was not drained")
        await drainer
        assert handler.statistics().gate.window.holders == 0
        assert handler.live_runs == 0
        return await graph.ainvoke(None, config)

    result = vtime.run(main())
    assert_continuous(tracker, result, 3)
    assert handler.statistics().gate.window.holders == 0


def test_a_model_called_outside_any_graph_is_its_own_agent() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=0)
    handler = ConcurCallbackHandler(law=FixedLaw(1))
    tracker.watch_holders(lambda: handler.statistics().gate.window.holders)

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(model.ainvoke(x["messages"], {"callbacks": [handler]}) for x in inputs(3))
        )

    answers = vtime.run(main())
    assert [a.content for a in answers] == [f"agent-{i} finished after 0 steps" for i in range(3)]
    assert tracker.max_in_flight == 1
    stats = handler.statistics().gate
    assert (stats.window.holders, stats.completed) == (0, 3)
    assert handler.live_runs == 0

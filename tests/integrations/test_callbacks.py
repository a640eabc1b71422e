"""ConcurCallbackHandler as a drop-in for code that calls graph.abatch itself."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _integration_support import (
    AgentFailure,
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    graph_with_subgraph,
    inputs,
    tool_loop_graph,
    work_tool,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurError,
    FixedLaw,
    LocalWindow,
    Permit,
    SyncInvocationError,
    vtime,
)

STEPS = 2


def _graph(tracker: Tracker, **kw: Any) -> Any:
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    return tool_loop_graph(model, [work_tool(tracker, **kw.pop("tool", {}))], **kw)


def _holders(handler: ConcurCallbackHandler) -> int:
    return handler.statistics().gate.window.holders


@pytest.mark.parametrize("nested", [False, True], ids=["graph", "subgraph"])
def test_handler_bounds_a_plain_abatch(nested: bool) -> None:
    tracker = Tracker()
    handler = ConcurCallbackHandler(law=FixedLaw(2))
    tracker.watch_holders(lambda: _holders(handler))
    graph = _graph(tracker)
    if nested:
        graph = graph_with_subgraph(graph)
    config: RunnableConfig = {"callbacks": [handler]}
    results = vtime.run(graph.abatch(inputs(6), config))
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert tracker.max_active == 2
    assert tracker.max_holders == 2
    stats = handler.statistics().gate
    assert (stats.window.holders, stats.completed, stats.llm_calls) == (0, 6, 6 * (STEPS + 1))
    assert handler.live_runs == 0


def test_agent_identity_is_the_thread_id_when_there_is_one() -> None:
    tracker = Tracker()
    handler = ConcurCallbackHandler(law=FixedLaw(1))
    graph = _graph(tracker, checkpointer=InMemorySaver())
    held_by_thread: list[bool] = []

    def holders() -> int:
        held_by_thread.append(handler.session.gate.holds("t-7"))
        return _holders(handler)

    tracker.watch_holders(holders)
    config: RunnableConfig = {"callbacks": [handler], "configurable": {"thread_id": "t-7"}}
    vtime.run(graph.ainvoke(inputs(1)[0], config))
    assert held_by_thread == [True] * (STEPS + 1)
    assert handler.statistics().gate.completed == 1


def test_an_agent_that_raises_releases_its_slot() -> None:
    tracker = Tracker()
    handler = ConcurCallbackHandler(law=FixedLaw(1))
    graph = _graph(tracker, tool={"failing": frozenset({"agent-0"})})
    config: RunnableConfig = {"callbacks": [handler]}
    results = vtime.run(graph.abatch(inputs(3), config, return_exceptions=True))
    assert isinstance(results[0], AgentFailure)
    for result in results[1:]:
        assert_continuous(tracker, result, STEPS)
    assert handler.statistics().gate.window.holders == 0
    assert handler.live_runs == 0


def test_cancellation_releases_slots_although_llm_end_never_fires() -> None:
    tracker = Tracker()
    handler = ConcurCallbackHandler(law=FixedLaw(2))
    graph = _graph(tracker)

    async def main() -> None:
        config: RunnableConfig = {"callbacks": [handler]}
        batch = asyncio.create_task(graph.abatch(inputs(5), config))
        await asyncio.sleep(0.5)  # virtual time: two agents are inside an LLM call, three wait
        stats = handler.statistics().gate
        assert (stats.active, stats.waiting, tracker.in_flight) == (2, 3, 2)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    vtime.run(main())
    stats = handler.statistics().gate
    assert (stats.window.holders, stats.active, stats.waiting) == (0, 0, 0)
    assert handler.live_runs == 0


def test_sync_graph_invoke_raises_a_clear_error() -> None:
    handler = ConcurCallbackHandler(law=FixedLaw(1))
    graph = _graph(Tracker())
    with pytest.raises(SyncInvocationError, match=r"use the async methods \(await graph\.ainvoke"):
        graph.invoke(inputs(1)[0], {"callbacks": [handler]})
    assert handler.live_runs == 0


def test_sync_model_call_inside_an_async_node_raises_instead_of_hanging() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)
    handler = ConcurCallbackHandler(law=FixedLaw(1))

    async def bad_node(state: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    from langgraph.graph import END, START, MessagesState, StateGraph

    builder = StateGraph(MessagesState)
    builder.add_node("agent", bad_node)
    builder.add_edge(START, "agent")
    builder.add_edge("agent", END)
    graph = builder.compile()
    with pytest.raises(SyncInvocationError, match=r"inside an async node: it would block"):
        vtime.run(graph.ainvoke(inputs(1)[0], {"callbacks": [handler]}))
    assert tracker.calls == {}  # the request was never sent
    assert handler.statistics().gate.window.holders == 0


def test_sync_model_call_in_a_plain_def_node_is_gated_from_its_worker_thread() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    graph = tool_loop_graph(model, [work_tool(tracker, latency_s=0.0)], sync_model_call=True)
    handler = ConcurCallbackHandler(law=FixedLaw(2))
    tracker.watch_holders(lambda: _holders(handler))

    async def main() -> list[Any]:
        return await graph.abatch(inputs(4), {"callbacks": [handler]})

    # A real loop with no modelled latency: the worker threads block in real time while the
    # loop admits them. (Under virtual time a blocked worker thread freezes the clock, so the
    # agents it waits for could never finish their timed tool calls.)
    results = asyncio.run(main())
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert tracker.max_holders <= 2
    assert tracker.max_active <= 2
    stats = handler.statistics().gate
    assert (stats.window.holders, stats.completed, stats.llm_calls) == (0, 4, 4 * (STEPS + 1))


def test_a_handler_with_signals_must_be_entered() -> None:
    handler = ConcurCallbackHandler(vllm_url="http://localhost:8000")
    graph = _graph(Tracker())
    with pytest.raises(ConcurError, match=r"must be entered first: `async with"):
        vtime.run(graph.ainvoke(inputs(1)[0], {"callbacks": [handler]}))


class _SignallingWindow(LocalWindow):
    """A LocalWindow that says when an acquire has to queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.queued = asyncio.Event()

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        if self.statistics().holders >= self.limit:
            self.queued.set()
        return await super().acquire(agent_id, parked=parked)


def test_cancelling_a_batch_frees_worker_threads_waiting_for_admission() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)
    never = asyncio.Event()

    @tool
    async def work(step: int) -> str:
        """Hold the agent (and its slot) forever."""
        await never.wait()
        return "unreachable"

    graph = tool_loop_graph(model, [work], sync_model_call=True)
    window = _SignallingWindow(1)
    handler = ConcurCallbackHandler(law=FixedLaw(1), window=window)

    async def main() -> None:
        batch = asyncio.create_task(graph.abatch(inputs(2), {"callbacks": [handler]}))
        await window.queued.wait()  # one agent holds the slot, the other's thread waits
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    # asyncio.run joins the executor's threads on exit: a thread stuck in the gate would hang.
    asyncio.run(main())
    stats = handler.statistics().gate
    assert (stats.window.holders, stats.active, stats.waiting) == (0, 0, 0)
    assert handler.live_runs == 0


def test_a_handler_can_be_entered_for_one_batch_after_another() -> None:
    tracker = Tracker()
    handler = ConcurCallbackHandler(law=FixedLaw(2))
    graph = _graph(tracker)

    async def main() -> list[int]:
        completed = []
        for _ in range(2):
            async with handler:
                await graph.abatch(inputs(3), {"callbacks": [handler]})
                completed.append(handler.statistics().gate.completed)
        return completed

    assert vtime.run(main()) == [3, 3]  # a fresh session (and count) per batch

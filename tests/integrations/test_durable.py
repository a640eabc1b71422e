"""Durable batches: a batch run again with its batch_id skips finished agents and resumes the rest.

Every run is in virtual time; the scripted model records each agent's calls, so "did not run
again" and "continued from its checkpoint" are counted, not guessed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import pytest
from _integration_support import (
    AgentFailure,
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    tool_loop_graph,
    work_tool,
)
from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import interrupt

from concur_langgraph import AgentDrainedError, ConcurGate, ConfigError, FixedLaw, vtime

STEPS = 3


def _gate(tracker: Tracker, *, window: int = 2, failing: set[str] | None = None) -> ConcurGate:
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    tools = [work_tool(tracker)] if failing is None else [_flaky_tool(failing)]
    graph = tool_loop_graph(model, tools)
    return ConcurGate(graph, law=FixedLaw(window), checkpointer=InMemorySaver())


def _flaky_tool(failing: set[str]) -> BaseTool:
    """``work`` that fails for the agents in ``failing``, a set the test empties later."""

    @tool("work")
    async def flaky(step: int, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        """Do one step of work."""
        agent = tool_call_id.split("|")[0]
        await asyncio.sleep(3.0)
        if agent in failing:
            raise AgentFailure(f"{agent} failed at step {step}")
        return f"result of step {step} for {agent}"

    return flaky


def _calls(tracker: Tracker) -> dict[str, int]:
    return {agent: len(calls) for agent, calls in tracker.calls.items()}


def test_a_finished_batch_run_again_returns_the_stored_outputs_without_running() -> None:
    tracker = Tracker()
    gate = _gate(tracker)
    tasks = inputs(5)

    async def main() -> tuple[list[Any], list[Any], list[tuple[int, Any]]]:
        first = await gate.abatch(tasks, batch_id="b1")
        again = await gate.abatch(tasks, batch_id="b1")
        streamed = [pair async for pair in gate.abatch_as_completed(tasks, batch_id="b1")]
        return first, again, streamed

    first, again, streamed = vtime.run(main())
    assert _calls(tracker) == {f"agent-{i}": STEPS + 1 for i in range(5)}
    assert [m.content for out in again for m in out["messages"]] == [
        m.content for out in first for m in out["messages"]
    ]
    assert sorted(index for index, _ in streamed) == list(range(5))
    for index, out in streamed:
        assert out["messages"][-1].content == f"agent-{index} finished after {STEPS} steps"
    stats = gate.statistics()
    assert stats is not None and stats.gate.window.holders == 0


def test_an_interrupted_batch_resumes_each_agent_from_its_checkpoint() -> None:
    tracker = Tracker()
    gate = _gate(tracker, window=2)
    tasks = inputs(6)

    async def crash_midway() -> None:
        run = asyncio.create_task(gate.abatch(tasks, batch_id="b2"))
        # Window 2, 4 calls of 1 s + 3 tools of 3 s per agent: at 20 s the first pair finished,
        # the second pair is mid-way and the rest have not started.
        await asyncio.sleep(20.0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    vtime.run(crash_midway())
    before = _calls(tracker)
    finished_before = set(tracker.finished)
    assert finished_before == {"agent-0", "agent-1"}
    midway = {a for a, n in before.items() if a not in finished_before}
    assert midway == {"agent-2", "agent-3"}

    results = vtime.run(gate.abatch(tasks, batch_id="b2"))
    after = _calls(tracker)
    for agent in finished_before:
        assert after[agent] == before[agent] == STEPS + 1  # not run again
    for index, out in enumerate(results):
        assert_continuous_resumed(tracker, out, f"agent-{index}")
    # The resumed agents did not repeat the calls their checkpoints already held: each made
    # exactly STEPS + 1 calls over both runs, save the one cut off mid-call by the crash.
    for agent in midway:
        assert STEPS + 1 <= after[agent] <= STEPS + 2
        assert after[agent] < before[agent] + STEPS + 1


def assert_continuous_resumed(tracker: Tracker, out: dict[str, Any], agent: str) -> None:
    messages = out["messages"]
    assert messages[-1].content == f"{agent} finished after {STEPS} steps"
    tool_results = [m.content for m in messages if m.type == "tool"]
    assert tool_results == [f"result of step {s} for {agent}" for s in range(1, STEPS + 1)]


def test_drain_stops_holders_at_a_boundary_and_waiters_at_once_then_resumes() -> None:
    tracker = Tracker()
    gate = _gate(tracker, window=2)
    tasks = inputs(6)

    async def drained() -> list[Any]:
        async def drain_soon() -> None:
            await asyncio.sleep(2.0)  # agents 0 and 1 are in their first tool call
            gate.request_drain("maintenance")

        drainer = asyncio.create_task(drain_soon())
        out = await gate.abatch(tasks, batch_id="b3", return_exceptions=True)
        await drainer
        return out

    first = vtime.run(drained())
    assert all(isinstance(out, AgentDrainedError) for out in first)
    assert {out.reason for out in first} == {"maintenance"}
    # The two holders finished the step they were in (their tool call) and stopped at the
    # boundary; the waiters never sent a call.
    assert _calls(tracker) == {"agent-0": 1, "agent-1": 1}
    stats = gate.statistics()
    assert stats is not None and stats.gate.window.holders == 0
    assert not gate.draining  # the drain ended with its session

    results = vtime.run(gate.abatch(tasks, batch_id="b3"))
    for index, out in enumerate(results):
        assert_continuous(tracker, out, STEPS)
        assert out["messages"][0].content == f"agent-{index}"


def test_a_failed_agent_is_resumed_from_its_checkpoint_not_restarted() -> None:
    tracker = Tracker()
    failing = {"agent-1"}
    gate = _gate(tracker, window=4, failing=failing)
    tasks = inputs(3)
    first = vtime.run(gate.abatch(tasks, batch_id="b4", return_exceptions=True))
    assert isinstance(first[1], AgentFailure)
    assert not isinstance(first[0], Exception) and not isinstance(first[2], Exception)
    assert _calls(tracker)["agent-1"] == 1  # failed in its first tool call

    failing.clear()  # the outage is over
    second = vtime.run(gate.abatch(tasks, batch_id="b4"))
    assert_continuous(tracker, second[1], STEPS)  # its first call was not repeated
    assert _calls(tracker) == {f"agent-{i}": STEPS + 1 for i in range(3)}


def _approval_graph(model: ScriptedChatModel) -> Any:
    async def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def approve(state: MessagesState) -> dict[str, Any]:
        return {"messages": [HumanMessage(f"approved: {interrupt('approve?')}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_node("approve", approve)
    builder.add_edge(START, "llm")
    builder.add_edge("llm", "approve")
    builder.add_edge("approve", END)
    return builder.compile()


def test_an_interrupted_agent_keeps_its_interrupt_as_its_outcome() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=0)
    gate = ConcurGate(_approval_graph(model), law=FixedLaw(1), checkpointer=InMemorySaver())
    first = vtime.run(gate.abatch(inputs(2), batch_id="b5"))
    again = vtime.run(gate.abatch(inputs(2), batch_id="b5"))
    assert [out["__interrupt__"][0].value for out in again] == ["approve?", "approve?"]
    assert [out["__interrupt__"][0].id for out in again] == [
        out["__interrupt__"][0].id for out in first
    ]
    assert _calls(tracker) == {"agent-0": 1, "agent-1": 1}


def test_a_changed_task_list_is_refused_naming_the_index() -> None:
    tracker = Tracker()
    gate = _gate(tracker)
    vtime.run(gate.abatch(inputs(2), batch_id="b6"))
    changed = [inputs(2)[0], {"messages": [HumanMessage("something else")]}]
    with pytest.raises(ConfigError, match=r"inputs\[1\]: thread 'b6/1'.*task list changed"):
        vtime.run(gate.abatch(changed, batch_id="b6"))


def test_a_thread_from_outside_the_batch_is_refused() -> None:
    tracker = Tracker()
    gate = _gate(tracker)
    vtime.run(gate.abatch(inputs(1), [{"configurable": {"thread_id": "mine"}}]))
    with pytest.raises(ConfigError, match=r"thread 'mine'.*not written by this batch"):
        vtime.run(gate.abatch(inputs(1), [{"configurable": {"thread_id": "mine"}}], batch_id="x"))


def test_durable_options_are_checked_before_anything_runs() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)
    plain = ConcurGate(tool_loop_graph(model, [work_tool(tracker)]), law=FixedLaw(1))
    with pytest.raises(ConfigError, match=r"batch_id=.b..*needs a checkpointer"):
        vtime.run(plain.abatch(inputs(1), batch_id="b"))
    gate = _gate(tracker)
    with pytest.raises(ConfigError, match="stream_mode='updates'"):
        vtime.run(gate.abatch(inputs(1), batch_id="b", stream_mode="updates"))
    with pytest.raises(ConfigError, match="batch_id must be a non-empty string"):
        vtime.run(gate.abatch(inputs(1), batch_id=""))
    with pytest.raises(ConfigError, match="checkpointer: expected a LangGraph checkpoint saver"):
        ConcurGate(tool_loop_graph(model, []), law=FixedLaw(1), checkpointer="db.sqlite")  # type: ignore[arg-type]
    assert tracker.calls == {}


def test_a_sqlite_batch_resumes_in_a_new_process_state(tmp_path: Path) -> None:
    """A fresh saver on the same file (what a restarted process sees) skips finished agents."""
    aiosqlite = pytest.importorskip("aiosqlite")
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    db = tmp_path / "batch.sqlite"
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)

    async def run(count: int) -> list[Any]:
        async with aiosqlite.connect(db) as conn:
            saver = AsyncSqliteSaver(conn)
            graph = tool_loop_graph(model, [work_tool(tracker)])
            gate = ConcurGate(graph, law=FixedLaw(2), checkpointer=saver)
            return await gate.abatch(inputs(count), batch_id="sq")

    # aiosqlite answers from its own thread: the loop must wait for it, not call a deadlock.
    first = vtime.run(run(2), strict=False)
    second = vtime.run(run(2), strict=False)
    assert [o["messages"][-1].content for o in second] == [o["messages"][-1].content for o in first]
    assert _calls(tracker) == {"agent-0": STEPS + 1, "agent-1": STEPS + 1}

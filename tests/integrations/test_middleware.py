"""ConcurMiddleware in langchain create_agent: gating, release on every way out."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from _integration_support import (
    AgentFailure,
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    work_tool,
)
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurMiddleware,
    FixedLaw,
    SyncInvocationError,
    vtime,
)
from concur_langgraph.sim import SimServer, get_preset

STEPS = 2


def _agent(tracker: Tracker, middleware: ConcurMiddleware, **kw: Any) -> Any:
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    checkpointer = kw.pop("checkpointer", None)
    return create_agent(
        model, [work_tool(tracker, **kw)], middleware=[middleware], checkpointer=checkpointer
    )


def _holders(middleware: ConcurMiddleware) -> int:
    return middleware.statistics().gate.window.holders


def test_middleware_bounds_agents_without_thread_ids() -> None:
    tracker = Tracker()
    middleware = ConcurMiddleware(law=FixedLaw(2))
    tracker.watch_holders(lambda: _holders(middleware))
    agent = _agent(tracker, middleware)

    async def main() -> list[Any]:
        async with middleware:
            return await agent.abatch(inputs(6))

    results = vtime.run(main())
    for result in results:
        assert_continuous(tracker, result, STEPS)
        assert "concur_agent_id" not in result  # private: not in the agent's output
    assert tracker.max_active == 2
    assert tracker.max_holders == 2
    stats = middleware.statistics().gate
    assert (stats.window.holders, stats.completed, stats.llm_calls) == (0, 6, 6 * (STEPS + 1))


def test_middleware_uses_thread_ids_with_a_checkpointer() -> None:
    tracker = Tracker()
    middleware = ConcurMiddleware(law=FixedLaw(1))
    agent = _agent(tracker, middleware, checkpointer=InMemorySaver())
    holders: list[bool] = []

    def check() -> int:
        gate = middleware.session.gate
        holders.append(gate.holds("th-0") or gate.holds("th-1"))
        return _holders(middleware)

    tracker.watch_holders(check)
    configs: list[RunnableConfig] = [{"configurable": {"thread_id": f"th-{i}"}} for i in range(2)]
    results = vtime.run(agent.abatch(inputs(2), configs))
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert holders and all(holders)
    assert tracker.max_active == 1


def test_a_failing_tool_releases_the_slot_although_after_agent_does_not_run() -> None:
    tracker = Tracker()
    middleware = ConcurMiddleware(law=FixedLaw(1))
    agent = _agent(tracker, middleware, failing=frozenset({"agent-0"}))
    results = vtime.run(agent.abatch(inputs(3), return_exceptions=True))
    assert isinstance(results[0], AgentFailure)
    for result in results[1:]:
        assert_continuous(tracker, result, STEPS)
    stats = middleware.statistics().gate
    assert (stats.window.holders, stats.active, stats.completed) == (0, 0, 3)


@pytest.mark.parametrize(
    ("at", "in_flight"), [(0.5, 2), (2.5, 0)], ids=["in-llm-call", "in-tool-call"]
)
def test_cancellation_releases_every_slot(at: float, in_flight: int) -> None:
    tracker = Tracker()
    middleware = ConcurMiddleware(law=FixedLaw(2))
    agent = _agent(tracker, middleware)

    async def main() -> None:
        batch = asyncio.create_task(agent.abatch(inputs(5)))
        await asyncio.sleep(at)  # two agents in their first LLM or tool call, three wait
        stats = middleware.statistics().gate
        assert (stats.active, stats.waiting, tracker.in_flight) == (2, 3, in_flight)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    vtime.run(main())
    stats = middleware.statistics().gate
    assert (stats.window.holders, stats.active, stats.waiting) == (0, 0, 0)


def test_middleware_with_a_handler_on_the_same_session_gates_each_agent_once() -> None:
    tracker = Tracker()
    middleware = ConcurMiddleware(law=FixedLaw(2))
    handler = ConcurCallbackHandler(session=middleware.session)
    tracker.watch_holders(lambda: _holders(middleware))
    agent = _agent(tracker, middleware)
    configs: list[RunnableConfig] = [
        {"callbacks": [handler], "configurable": {"thread_id": f"a{i}"}} for i in range(4)
    ]
    results = vtime.run(agent.abatch(inputs(4), configs))
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert tracker.max_holders == 2
    assert tracker.max_active == 2
    assert handler.live_runs == 0
    # Both the middleware and the handler passed each call through the gate.
    assert middleware.statistics().gate.llm_calls == 2 * 4 * (STEPS + 1)


def test_sync_invoke_raises_a_clear_error() -> None:
    middleware = ConcurMiddleware(law=FixedLaw(1))
    agent = _agent(Tracker(), middleware)
    with pytest.raises(SyncInvocationError, match=r"use `await agent\.ainvoke\(\.\.\.\)`"):
        agent.invoke(inputs(1)[0])


def test_create_agent_with_tools_runs_to_its_answer_against_the_simulator() -> None:
    """ChatOpenAI on the simulator, which answers bound tools with tool calls: each agent loops
    model -> tools -> model as with a real tool-calling model, and the gate bounds it."""
    ran: list[str] = []

    @tool
    async def lookup(query: str) -> str:
        """Look something up."""
        await asyncio.sleep(1.0)
        ran.append("lookup")
        return f"nothing found for {query}"

    @tool
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        await asyncio.sleep(0.5)
        ran.append("add")
        return a + b

    async def main() -> tuple[list[Any], int, Any]:
        config = dataclasses.replace(get_preset("test-tiny"), tool_call_turns=(1, 3))
        async with SimServer(config) as server:
            middleware = ConcurMiddleware(law=FixedLaw(2))
            agent = create_agent(
                server.chat_model(max_tokens=16), [lookup, add], middleware=[middleware]
            )
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
                async with middleware:
                    inputs = [{"messages": [HumanMessage(f"question {i}")]} for i in range(6)]
                    results = await agent.abatch(inputs)
            finally:
                done.set()
                await watcher
            return results, seen, middleware.statistics().gate

    results, seen, stats = vtime.run(main())
    assert len(results) == 6
    calls = 0
    for result in results:
        answers = [m for m in result["messages"] if isinstance(m, AIMessage)]
        observations = [m for m in result["messages"] if isinstance(m, ToolMessage)]
        assert 2 <= len(answers) <= 4  # one to three tool calls, then the answer
        assert answers[-1].tool_calls == [] and all(a.tool_calls for a in answers[:-1])
        assert len(observations) == len(answers) - 1
        assert all(o.status == "success" for o in observations)
        calls += len(answers)
    assert sorted(set(ran)) == ["add", "lookup"] and len(ran) == calls - 6
    assert seen <= 2
    assert (stats.window.holders, stats.completed, stats.llm_calls) == (0, 6, calls)

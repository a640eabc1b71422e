"""ConcurMiddleware in langchain create_agent: gating, release on every way out."""

from __future__ import annotations

import asyncio
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
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from concur_langgraph import vtime
from concur_langgraph._callbacks import ConcurCallbackHandler
from concur_langgraph._errors import SyncInvocationError
from concur_langgraph._laws import FixedLaw
from concur_langgraph._middleware import ConcurMiddleware

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

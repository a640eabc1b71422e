"""ConcurGate on real LangGraph graphs: window bound, order, outcomes, parking, thread ids."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
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
from langchain.agents import create_agent
from langgraph.checkpoint.memory import InMemorySaver

from concur_langgraph import ConcurGate, ConfigError, FixedLaw, SyncInvocationError, vtime

STEPS = 3


def _tool_loop(tracker: Tracker, **kw: Any) -> Any:
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    return tool_loop_graph(model, [work_tool(tracker, **kw)])


def _create_agent(tracker: Tracker, **kw: Any) -> Any:
    model = ScriptedChatModel(tracker=tracker, steps=STEPS)
    return create_agent(model, [work_tool(tracker, **kw)])


def _subgraph(tracker: Tracker, **kw: Any) -> Any:
    return graph_with_subgraph(_tool_loop(tracker, **kw))


GRAPHS: dict[str, Callable[..., Any]] = {
    "tool_loop": _tool_loop,
    "create_agent": _create_agent,
    "subgraph": _subgraph,
}


def _watch(tracker: Tracker, gate: ConcurGate) -> None:
    def holders() -> int:
        stats = gate.statistics()
        assert stats is not None
        return stats.gate.window.holders

    tracker.watch_holders(holders)


@pytest.mark.parametrize("kind", sorted(GRAPHS))
def test_fixed_window_bounds_agents_and_results_come_back_in_order(kind: str) -> None:
    tracker = Tracker()
    gate = ConcurGate(GRAPHS[kind](tracker), law=FixedLaw(3))
    _watch(tracker, gate)
    results = vtime.run(gate.abatch(inputs(8)))

    assert [r["messages"][0].content for r in results] == [f"agent-{i}" for i in range(8)]
    for result in results:
        assert_continuous(tracker, result, STEPS)
    # Seen from the model: never more than 3 agents mid-run, and the window was used fully.
    assert tracker.max_active == 3
    assert tracker.max_holders == 3
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.active, stats.gate.completed) == (0, 0, 8)
    assert stats.gate.llm_calls == 8 * (STEPS + 1)


def test_without_the_gate_the_same_batch_runs_all_agents_at_once() -> None:
    # The tracker would see a violation: all 8 agents are mid-run together.
    tracker = Tracker()
    vtime.run(_tool_loop(tracker).abatch(inputs(8)))
    assert tracker.max_active == 8


def test_each_agent_gets_its_own_thread_and_the_checkpointer_keeps_them_apart() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=2)
    saver = InMemorySaver()
    graph = tool_loop_graph(model, [work_tool(tracker)], checkpointer=saver)
    gate = ConcurGate(graph, law=FixedLaw(2))
    results = vtime.run(gate.abatch(inputs(4)))
    threads = {t.config["configurable"]["thread_id"] for t in saver.list(None)}
    assert len(threads) == 4
    for result in results:
        assert_continuous(tracker, result, 2)


def test_caller_thread_ids_are_kept() -> None:
    tracker = Tracker()
    saver = InMemorySaver()
    model = ScriptedChatModel(tracker=tracker, steps=1)
    graph = tool_loop_graph(model, [work_tool(tracker)], checkpointer=saver)
    gate = ConcurGate(graph, law=FixedLaw(2))
    configs: list[Any] = [{"configurable": {"thread_id": f"mine-{i}"}} for i in range(3)]
    vtime.run(gate.abatch(inputs(3), configs))
    threads = {t.config["configurable"]["thread_id"] for t in saver.list(None)}
    assert threads == {"mine-0", "mine-1", "mine-2"}


def test_one_config_with_a_thread_id_for_many_inputs_is_refused() -> None:
    gate = ConcurGate(_tool_loop(Tracker()), law=FixedLaw(2))
    with pytest.raises(ConfigError, match=r"^config: one config with configurable.thread_id='t'"):
        vtime.run(gate.abatch(inputs(2), {"configurable": {"thread_id": "t"}}))
    configs: list[Any] = [{"configurable": {"thread_id": "same"}}] * 2
    with pytest.raises(ConfigError, match=r"config\[1\]: thread_id 'same' is also"):
        vtime.run(gate.abatch(inputs(2), configs))
    with pytest.raises(ConfigError, match=r"got 1 configs for 2 inputs"):
        vtime.run(gate.abatch(inputs(2), [{}]))


def test_return_exceptions_puts_each_failure_in_its_place_and_releases_its_slot() -> None:
    tracker = Tracker()
    graph = _tool_loop(tracker, failing=frozenset({"agent-1", "agent-4"}))
    gate = ConcurGate(graph, law=FixedLaw(2))
    results = vtime.run(gate.abatch(inputs(6), return_exceptions=True))
    for i, result in enumerate(results):
        if i in (1, 4):
            assert isinstance(result, AgentFailure)
            assert str(result) == f"agent-{i} failed at step 1"
        else:
            assert_continuous(tracker, result, STEPS)
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 6)
    assert tracker.max_active <= 2


def test_without_return_exceptions_the_failure_is_raised_and_nothing_keeps_running() -> None:
    tracker = Tracker()
    graph = _tool_loop(tracker, failing=frozenset({"agent-0"}))
    gate = ConcurGate(graph, law=FixedLaw(2))

    async def main() -> None:
        with pytest.raises(AgentFailure, match="agent-0 failed"):
            await gate.abatch(inputs(6))
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert tasks == []  # the other agents were cancelled and unwound

    vtime.run(main())
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.active, stats.gate.waiting) == (0, 0, 0)
    assert len(tracker.finished) < 6


def test_the_other_failures_are_retrieved_so_asyncio_reports_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four agents fail at the same moment: the first failure is raised, and the three others
    are retrieved, not left for asyncio to print as "Task exception was never retrieved"."""
    tracker = Tracker()
    failing = frozenset(f"agent-{i}" for i in range(4))
    gate = ConcurGate(_tool_loop(tracker, failing=failing), law=FixedLaw(4))

    async def main() -> None:
        with pytest.raises(AgentFailure):
            await gate.abatch(inputs(4))

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        vtime.run(main())
        gc.collect()  # an unretrieved task exception is reported when the task is collected
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_an_empty_batch_returns_nothing_and_has_statistics() -> None:
    gate = ConcurGate(_tool_loop(Tracker()), law=FixedLaw(2))

    async def main() -> tuple[list[Any], list[Any]]:
        streamed = [pair async for pair in gate.abatch_as_completed([])]
        return await gate.abatch([]), streamed

    assert vtime.run(main()) == ([], [])
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.completed, stats.gate.llm_calls, stats.gate.window.limit) == (0, 0, 2)
    assert gate.session is None


def test_cancelling_abatch_releases_every_slot() -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker), law=FixedLaw(3))

    async def main() -> None:
        batch = asyncio.create_task(gate.abatch(inputs(8)))
        await asyncio.sleep(5.5)  # virtual: mid-run, 3 agents admitted, 5 waiting
        stats = gate.statistics()
        assert stats is not None
        assert (stats.gate.active, stats.gate.waiting) == (3, 5)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    vtime.run(main())
    stats = gate.statistics()
    assert stats is not None
    gs = stats.gate
    assert (gs.window.holders, gs.active, gs.waiting, gs.parked) == (0, 0, 0, 0)
    assert (gs.window.waiting_new, gs.window.waiting_parked) == (0, 0)
    assert gate.session is None  # the session was closed with the batch


def test_shrinking_the_window_parks_agents_whose_state_is_intact_when_they_resume() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=4)
    gate = ConcurGate(tool_loop_graph(model, [work_tool(tracker)]), law=FixedLaw(4))

    async def shrink() -> None:
        await asyncio.sleep(2.5)  # virtual time: every agent is inside its first tool call
        session = gate.session
        assert session is not None
        await session.window.set_limit(1)

    async def main() -> list[Any]:
        shrinker = asyncio.create_task(shrink())
        results = await gate.abatch(inputs(4))
        await shrinker
        return results

    results = vtime.run(main())
    stats = gate.statistics()
    assert stats is not None
    # The three most recently admitted agents parked at their next LLM call.
    assert stats.gate.parks_total == 3
    assert stats.gate.window.resumed_total == 3
    for result in results:
        assert_continuous(tracker, result, 4)


def test_abatch_as_completed_yields_every_index_with_its_output() -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker, failing=frozenset({"agent-2"})), law=FixedLaw(2))

    async def main() -> list[tuple[int, Any]]:
        return [pair async for pair in gate.abatch_as_completed(inputs(5), return_exceptions=True)]

    pairs = vtime.run(main())
    assert sorted(i for i, _ in pairs) == [0, 1, 2, 3, 4]
    for index, out in pairs:
        if index == 2:
            assert isinstance(out, AgentFailure)
        else:
            assert out["messages"][0].content == f"agent-{index}"


def test_leaving_abatch_as_completed_early_cancels_the_rest() -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker), law=FixedLaw(2))

    async def main() -> int:
        async with contextlib.aclosing(gate.abatch_as_completed(inputs(6))) as stream:
            async for index, _ in stream:
                return index
        raise AssertionError("nothing yielded")

    vtime.run(main())
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.active, stats.gate.waiting) == (0, 0, 0)
    assert len(tracker.finished) < 6


def test_astream_streams_the_graph_and_releases() -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker), law=FixedLaw(1))

    async def main() -> list[Any]:
        return [chunk async for chunk in gate.astream(inputs(1)[0], stream_mode="updates")]

    chunks = vtime.run(main())
    assert [next(iter(c)) for c in chunks] == ["agent", "tools"] * STEPS + ["agent"]
    stats = gate.statistics()
    assert stats is not None
    assert (stats.gate.window.holders, stats.gate.completed) == (0, 1)


def test_concurrent_ainvoke_calls_share_one_window() -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker), law=FixedLaw(2))

    async def main() -> list[Any]:
        return await asyncio.gather(*(gate.ainvoke(x) for x in inputs(5)))

    results = vtime.run(main())
    assert tracker.max_active == 2
    for result in results:
        assert_continuous(tracker, result, STEPS)


def _most_calls_in_one_second(times: list[float]) -> int:
    return max(sum(1 for u in times if t <= u < t + 1.0 - 1e-9) for t in times)


@pytest.mark.parametrize("max_rps", [None, 2.0])
def test_max_rps_caps_the_call_rate_on_top_of_the_window(max_rps: float | None) -> None:
    tracker = Tracker()
    gate = ConcurGate(_tool_loop(tracker), law=FixedLaw(6), max_rps=max_rps)
    results = vtime.run(gate.abatch(inputs(6)))
    for result in results:
        assert_continuous(tracker, result, STEPS)
    assert len(tracker.call_times) == 6 * (STEPS + 1)
    if max_rps is None:
        assert _most_calls_in_one_second(tracker.call_times) == 6  # all agents at once
    else:
        # aiolimiter's bucket: a burst of 2, then one call per 0.5 s.
        assert _most_calls_in_one_second(tracker.call_times) <= 3


def test_sync_methods_raise_naming_the_async_one() -> None:
    gate = ConcurGate(_tool_loop(Tracker()), law=FixedLaw(2))
    with pytest.raises(SyncInvocationError, match=r"use `await gate\.ainvoke\(\.\.\.\)`"):
        gate.invoke(inputs(1)[0])
    with pytest.raises(SyncInvocationError, match=r"use `await gate\.abatch\(\.\.\.\)`"):
        gate.batch(inputs(2))
    with pytest.raises(SyncInvocationError, match=r"use `await gate\.astream\(\.\.\.\)`"):
        gate.stream(inputs(1)[0])


def test_bad_options_fail_at_construction_naming_the_field() -> None:
    graph = _tool_loop(Tracker())
    with pytest.raises(ConfigError, match=r"^vllm_url: the law FitLaw"):
        ConcurGate(graph)
    with pytest.raises(ConfigError, match=r"^vllm_url: 'localhost:8000' is not an http"):
        ConcurGate(graph, vllm_url="localhost:8000")
    # A bad port fails here too, not at the first batch.
    with pytest.raises(ConfigError, match=r"^vllm_url: 'http://h:notaport' has no valid port"):
        ConcurGate(graph, vllm_url="http://h:notaport")
    with pytest.raises(ConfigError, match=r"^initial_window: must be None or an integer >= 1"):
        ConcurGate(graph, vllm_url="http://localhost:8000", initial_window=0)
    with pytest.raises(ConfigError, match=r"^graph: expected a compiled LangGraph graph"):
        ConcurGate(object(), law=FixedLaw(1))  # type: ignore[arg-type]

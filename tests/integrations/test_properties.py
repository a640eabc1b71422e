"""Property: whatever agents fail and whenever the batch is cancelled, the window bound holds,
every outcome comes back in place, and no slot or run bookkeeping is left behind."""

from __future__ import annotations

import asyncio
from typing import Any

from _integration_support import (
    AgentFailure,
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    tool_loop_graph,
    work_tool,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from concur_langgraph import ConcurGate, FixedLaw, vtime


@settings(max_examples=25, deadline=None)
@given(
    agents=st.integers(min_value=1, max_value=7),
    window=st.integers(min_value=1, max_value=4),
    steps=st.integers(min_value=0, max_value=3),
    failing=st.sets(st.integers(min_value=0, max_value=6), max_size=3),
    cancel_at=st.one_of(st.none(), st.floats(min_value=0.0, max_value=20.0)),
)
def test_no_leak_and_bound_holds_under_failures_and_cancellation(
    agents: int, window: int, steps: int, failing: set[int], cancel_at: float | None
) -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=steps)
    failing_names = frozenset(f"agent-{i}" for i in failing)
    graph = tool_loop_graph(model, [work_tool(tracker, failing=failing_names)])
    gate = ConcurGate(graph, law=FixedLaw(window))

    async def main() -> list[Any] | None:
        batch = asyncio.create_task(gate.abatch(inputs(agents), return_exceptions=True))
        if cancel_at is not None:
            done, _ = await asyncio.wait([batch], timeout=cancel_at)
            if not done:
                batch.cancel()
                try:
                    await batch
                except asyncio.CancelledError:
                    return None
        return await batch

    results = vtime.run(main())
    assert tracker.max_active <= window
    stats = gate.statistics()
    assert stats is not None
    gs = stats.gate
    assert (gs.window.holders, gs.active, gs.parked, gs.waiting) == (0, 0, 0, 0)
    assert (gs.window.waiting_new, gs.window.waiting_parked) == (0, 0)
    if results is not None:
        assert len(results) == agents
        for i, result in enumerate(results):
            if i in failing and steps > 0:
                assert isinstance(result, AgentFailure)
            else:
                assert_continuous(tracker, result, steps)

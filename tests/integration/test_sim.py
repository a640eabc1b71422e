"""The whole stack on the simulator in virtual time: ChatOpenAI -> openai SDK -> httpx on ASGI ->
simulated vLLM, with the gate checked from the server's side."""

from __future__ import annotations

import asyncio
from typing import Any

from concur_langgraph import vtime
from concur_langgraph._laws import FixedLaw
from concur_langgraph._wrapper import ConcurGate
from concur_langgraph.sim import SimServer
from concur_langgraph.testing.agent_loop import loop_tasks, observation_loop

STEPS = 3


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

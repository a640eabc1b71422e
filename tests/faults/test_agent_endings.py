"""Agents that end badly inside a batch on the simulator: raising, hitting the recursion limit,
interrupted for a human, cancelled. Each outcome is recorded, each slot comes back, and the other
agents of the batch all finish. The window (2) is smaller than the batch, so a slot that did not
come back would leave agents waiting forever (the strict virtual loop would say so)."""

from __future__ import annotations

import asyncio
from typing import Any

from _faults_support import STEPS, ToolFailure, agent_graph, chat_model, finished_ok, tasks
from langgraph.errors import GraphRecursionError
from langgraph.types import Command

from concur_langgraph import ConcurGate, FixedLaw, vtime
from concur_langgraph.sim import SimServer

WINDOW = 2
# ok agents need 2 * STEPS + 1 super-steps; a looping agent never ends.
RECURSION_LIMIT = 2 * STEPS + 3
BEHAVIOURS = ["ok", "raise", "ok", "loop", "ok", "interrupt", "ok", "ok"]


def test_raise_recursion_and_interrupt_in_one_batch_are_recorded_and_release_their_slots() -> None:
    async def main() -> tuple[list[Any], Any, Any, list[Any]]:
        async with SimServer("test-tiny") as server:
            gate = ConcurGate(agent_graph(chat_model(server)), law=FixedLaw(WINDOW))
            configs: list[Any] = [
                {"recursion_limit": RECURSION_LIMIT, "configurable": {"thread_id": f"a{i}"}}
                for i in range(len(BEHAVIOURS))
            ]
            results = await gate.abatch(tasks(BEHAVIOURS), configs, return_exceptions=True)
            stats = gate.statistics()
            # The interrupted agent is resumed by its human, on its thread, through the gate.
            index = BEHAVIOURS.index("interrupt")
            resumed = await gate.abatch([Command(resume="yes")], [configs[index]])
            return results, stats, gate.statistics(), resumed

    results, stats, after_resume, resumed = vtime.run(main())
    outcome = dict(zip(BEHAVIOURS, results, strict=False))
    assert isinstance(outcome["raise"], ToolFailure)
    assert isinstance(outcome["loop"], GraphRecursionError)
    assert "__interrupt__" in results[BEHAVIOURS.index("interrupt")]
    ok = [r for b, r in zip(BEHAVIOURS, results, strict=True) if b == "ok"]
    assert len(ok) == 5 and all(finished_ok(r) for r in ok)
    gate = stats.gate
    assert (gate.window.holders, gate.active, gate.waiting, gate.parked) == (0, 0, 0, 0)
    assert gate.completed == len(BEHAVIOURS)
    assert finished_ok(resumed[0])
    assert resumed[0]["messages"][2].content == "approved: yes"
    assert after_resume.gate.window.holders == 0


def test_a_cancelled_agent_releases_its_slot_and_its_request_is_aborted_on_the_server() -> None:
    async def main() -> tuple[list[Any], Any, Any, int]:
        async with SimServer("test-tiny") as server:
            gate = ConcurGate(agent_graph(chat_model(server)), law=FixedLaw(WINDOW))
            async with gate:
                runs = [asyncio.create_task(gate.ainvoke(task)) for task in tasks(["ok"] * 6)]
                # Cancel agent 0 while its first LLM call is on the server (virtual time: the
                # moment is the same on every run).
                await asyncio.sleep(0.002)
                assert server.engine.metrics().num_requests_running == WINDOW
                assert gate.session is not None
                assert gate.session.gate.statistics().window.holders == WINDOW
                runs[0].cancel()
                results = await asyncio.gather(*runs, return_exceptions=True)
                stats = gate.statistics()
            metrics = server.engine.metrics()
            return results, stats, metrics, metrics.num_requests_aborted

    results, stats, metrics, aborted = vtime.run(main())
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(finished_ok(r) for r in results[1:])
    assert (stats.gate.window.holders, stats.gate.active, stats.gate.completed) == (0, 0, 6)
    # The cancelled call did not keep running on the server.
    assert aborted == 1
    assert (metrics.num_requests_running, metrics.num_requests_waiting) == (0, 0)

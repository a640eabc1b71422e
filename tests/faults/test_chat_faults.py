"""A batch of LangGraph agents whose LLM calls fail on the server: 5xx, 429, hangs.

The outcome follows the caller's ``ChatOpenAI`` retry settings: with retries the openai SDK
retries and every agent succeeds; with ``max_retries=0`` the agents hit by a fault fail with
the server's error, their slots come back, and the rest of the batch finishes. A fixed window
smaller than the batch makes a leaked slot visible: the agents behind it would never start.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from _faults_support import agent_graph, chat_model, finished_ok, tasks

from concur_langgraph import ConcurCallbackHandler, ConcurGate, FixedLaw, vtime
from concur_langgraph.sim import SimServer
from concur_langgraph.sim._faults import Faults

AGENTS = 8
WINDOW = 3
TIMEOUT_S = 20.0
"""The agents' ChatOpenAI timeout (virtual seconds): what a hung call costs them."""

FAULTS = {
    "500": Faults(chat="error", chat_status=500),
    "503-retry-after": Faults(chat="error", chat_status=503, chat_retry_after_s=2.0),
    "429-retry-after": Faults(chat="error", chat_status=429, chat_retry_after_s=1.0),
    "hang": Faults(chat="hang"),
}
ERRORS: dict[str, type[Exception]] = {
    "500": openai.InternalServerError,
    "503-retry-after": openai.InternalServerError,
    "429-retry-after": openai.RateLimitError,
    "hang": openai.APITimeoutError,
}


def _run(fault: Faults, *, max_retries: int) -> tuple[list[Any], Any, Any]:
    async def main() -> tuple[list[Any], Any, Any]:
        async with SimServer("test-tiny", faults=fault) as server:
            model = chat_model(server, max_retries=max_retries, timeout=TIMEOUT_S)
            gate = ConcurGate(agent_graph(model), law=FixedLaw(WINDOW))
            results = await gate.abatch(tasks(["ok"] * AGENTS), return_exceptions=True)
            return results, gate.statistics(), server.faults.statistics()

    return vtime.run(main())


@pytest.mark.parametrize("name", list(FAULTS))
def test_with_retries_every_agent_succeeds_through_the_faults(name: str) -> None:
    # Four faulted calls in all, and each call may be tried five times: whichever calls the
    # faults hit, the SDK gets through.
    fault = Faults(**{**FAULTS[name].to_json(), "chat_next": 4})
    results, stats, faults = _run(fault, max_retries=4)
    assert all(finished_ok(r) for r in results), results
    assert faults.chat_faulted == 4
    # Each agent made STEPS + 1 successful calls; the SDK's retries are the extra ones.
    assert faults.chat_calls == stats.gate.llm_calls + 4
    assert (stats.gate.window.holders, stats.gate.completed) == (0, AGENTS)


@pytest.mark.parametrize("name", list(FAULTS))
def test_without_retries_the_hit_agents_fail_with_the_servers_error_and_the_rest_finish(
    name: str,
) -> None:
    # The first two calls go to the first two agents admitted: both fail at their first call.
    fault = Faults(**{**FAULTS[name].to_json(), "chat_next": 2})
    results, stats, faults = _run(fault, max_retries=0)
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 2 and faults.chat_faulted == 2
    assert all(isinstance(r, ERRORS[name]) for r in failed), failed
    if isinstance(failed[0], openai.APIStatusError):
        assert failed[0].status_code == fault.chat_status
    assert all(finished_ok(r) for r in results if not isinstance(r, Exception))
    gate = stats.gate
    assert (gate.window.holders, gate.active, gate.waiting, gate.completed) == (0, 0, 0, AGENTS)


def test_a_seeded_fraction_of_failing_calls_fails_exactly_the_agents_it_hits() -> None:
    fault = Faults(chat="error", chat_status=503, chat_fraction=0.2, seed=3)
    results, stats, faults = _run(fault, max_retries=0)
    failed = [r for r in results if isinstance(r, Exception)]
    # An agent stops at its first failed call, so one failed agent per faulted call.
    assert 0 < len(failed) == faults.chat_faulted < AGENTS
    assert all(isinstance(r, openai.InternalServerError) for r in failed)
    assert sum(finished_ok(r) for r in results) == AGENTS - len(failed)
    assert (stats.gate.window.holders, stats.gate.completed) == (0, AGENTS)
    # Virtual time and a seed: the same agents fail on every run.
    again, _, _ = _run(fault, max_retries=0)
    assert [isinstance(r, Exception) for r in again] == [isinstance(r, Exception) for r in results]


def test_a_hung_call_costs_the_agent_its_timeout_then_the_sdk_retries() -> None:
    async def main() -> tuple[Any, float]:
        async with SimServer("test-tiny", faults=Faults(chat="hang", chat_next=1)) as server:
            model = chat_model(server, max_retries=1, timeout=TIMEOUT_S)
            gate = ConcurGate(agent_graph(model), law=FixedLaw(1))
            loop = asyncio.get_running_loop()
            (result,) = await gate.abatch(tasks(["ok"]))
            return result, loop.time()

    result, took = vtime.run(main())
    assert finished_ok(result)
    # The hung call waited the whole timeout before the retry (plus a backoff under 1 s).
    assert TIMEOUT_S < took


def test_a_429_retry_after_is_waited_for_before_the_retry() -> None:
    async def main() -> tuple[float, float]:
        times: list[float] = []
        async with SimServer("test-tiny") as server:
            model = chat_model(server, max_retries=1, timeout=TIMEOUT_S)

            async def timed_call() -> None:
                times.append(asyncio.get_running_loop().time())
                await model.ainvoke("hello")

            await timed_call()
            clean = asyncio.get_running_loop().time() - times[0]
            server.faults.set(
                Faults(chat="error", chat_status=429, chat_retry_after_s=7.0, chat_next=1)
            )
            start = asyncio.get_running_loop().time()
            await model.ainvoke("hello")
            return clean, asyncio.get_running_loop().time() - start

    clean, with_429 = vtime.run(main())
    assert with_429 == pytest.approx(clean + 7.0)


def test_the_callback_handler_on_a_plain_abatch_releases_the_failed_agents_slots() -> None:
    async def main() -> tuple[list[Any], Any, int]:
        fault = Faults(chat="error", chat_status=500, chat_next=2)
        async with SimServer("test-tiny", faults=fault) as server:
            graph = agent_graph(chat_model(server, max_retries=0))
            handler = ConcurCallbackHandler(law=FixedLaw(WINDOW))
            configs: list[Any] = [
                {"callbacks": [handler], "configurable": {"thread_id": f"t{i}"}}
                for i in range(AGENTS)
            ]
            results = await graph.abatch(tasks(["ok"] * AGENTS), configs, return_exceptions=True)
            return results, handler.statistics(), handler.live_runs

    results, stats, live_runs = vtime.run(main())
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 2 and all(isinstance(r, openai.InternalServerError) for r in failed)
    assert sum(finished_ok(r) for r in results) == AGENTS - 2
    assert (stats.gate.window.holders, stats.gate.completed, live_runs) == (0, AGENTS, 0)

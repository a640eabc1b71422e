"""A whole batch of LangGraph agents on the simulator while its /metrics misbehaves mid-batch.

ConcurGate -> LangGraph -> ChatOpenAI -> the simulator, in virtual time, with the controller
scraping the simulator's /metrics every 0.5 s. The fault is switched on and off through the
simulator's admin route while the batch runs. Every agent must finish; during the fault the
controller holds the window and says its data are stale; afterwards it acts on data again.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from _faults_support import (
    Observation,
    RampLaw,
    agent_graph,
    chat_model,
    finished_ok,
    tasks,
    watch,
)

from concur_langgraph import ConcurCallbackHandler, ConcurGate, vtime
from concur_langgraph.core.signals import DEFAULT_METRICS_TIMEOUT_S
from concur_langgraph.sim import SimServer
from concur_langgraph.sim._faults import Faults

AGENTS = 20
INTERVAL_S = 0.5
# Between two ticks, so which of the fault switch and a tick comes first is never a tie.
FAULT_ON = 2.25
FAULT_OFF = 5.25

pytestmark = pytest.mark.parametrize("engine", ["vllm", "sglang"])


async def _batch(
    fault: Faults | None,
    *,
    resets: tuple[float, ...] = (),
    way: str = "gate",
    engine: str = "vllm",
) -> dict[str, Any]:
    async with SimServer("test-tiny", engine=engine) as server, server.http_client() as admin:
        law = RampLaw()
        graph = agent_graph(chat_model(server))
        options: dict[str, Any] = {
            "vllm_url": server.root_url,
            "http_client": admin,
            "law": law,
            "interval_s": INTERVAL_S,
            "initial_window": 1,
        }
        gate: Any
        if way == "gate":
            gate = ConcurGate(graph, **options)
        else:
            gate = ConcurCallbackHandler(**options)
        observations: list[Observation] = []

        async def drive() -> None:
            loop = asyncio.get_running_loop()
            if fault is not None:
                await asyncio.sleep(FAULT_ON - loop.time())
                answer = await admin.post("/_sim/faults", json=fault.to_json())
                assert answer.status_code == 200
                await asyncio.sleep(FAULT_OFF - loop.time())
                assert (await admin.post("/_sim/faults", json={})).status_code == 200
            for at in resets:
                await asyncio.sleep(at - loop.time())
                assert (await admin.post("/_sim/reset-counters")).status_code == 200

        watcher = asyncio.create_task(watch(gate, observations))
        driver = asyncio.create_task(drive())
        try:
            if way == "gate":
                results = await gate.abatch(tasks(["ok"] * AGENTS))
            else:
                async with gate:
                    configs: list[Any] = [
                        {"callbacks": [gate], "configurable": {"thread_id": f"t{i}"}}
                        for i in range(AGENTS)
                    ]
                    results = await graph.abatch(tasks(["ok"] * AGENTS), configs)
        finally:
            watcher.cancel()
        await driver
        stats = gate.statistics()
        assert stats is not None
        return {
            "results": results,
            "observations": observations,
            "stats": stats,
            "law": law,
            "engine": server.engine.metrics(),
            "faults": server.faults.statistics(),
        }


def _check_batch_completed(run: dict[str, Any]) -> None:
    assert all(finished_ok(r) for r in run["results"])
    gate = run["stats"].gate
    assert (gate.window.holders, gate.active, gate.completed) == (0, 0, AGENTS)


@pytest.mark.parametrize(
    "fault",
    [
        Faults(metrics="down"),
        Faults(metrics="error", metrics_status=503),
        Faults(metrics="garbage"),
        Faults(metrics="html"),
        Faults(metrics="slow", metrics_delay_s=30.0),
    ],
    ids=["down", "503", "garbage", "html", "slow-past-the-scrape-timeout"],
)
def test_metrics_fault_mid_batch_holds_the_window_marks_stale_and_recovers(
    fault: Faults, engine: str
) -> None:
    _check_held_and_recovered(vtime.run(_batch(fault, engine=engine)), fault)


def test_the_callback_handler_on_a_plain_abatch_rides_out_a_metrics_outage_too(
    engine: str,
) -> None:
    fault = Faults(metrics="down")
    _check_held_and_recovered(vtime.run(_batch(fault, way="handler", engine=engine)), fault)


def _check_held_and_recovered(run: dict[str, Any], fault: Faults) -> None:
    _check_batch_completed(run)
    observations: list[Observation] = run["observations"]
    controller = run["stats"].controller

    stale = [o for o in observations if o.stale]
    assert stale, "the controller never said its data were stale"
    assert all(FAULT_ON < o.time for o in stale)
    # Recovery: the first moment after the fault at which the data are fresh again.
    recovered = next(o for o in observations if o.time > stale[-1].time)
    assert not recovered.stale
    held = [o for o in observations if FAULT_ON <= o.time < recovered.time]
    assert len({o.window for o in held}) == 1, "the window moved without data"
    held_window = held[0].window
    before = [o for o in observations if o.time < FAULT_ON]
    assert before[-1].window == held_window  # held where the fault found it
    # ... and it moves again on fresh data, while agents still wait.
    assert any(o.window > held_window for o in observations if o.time > recovered.time)
    assert controller.errors >= 1 and not controller.stale
    if fault.metrics == "slow":
        # Each of those scrapes ran into the source's timeout, and the ticks it overlapped
        # were skipped, not run back to back afterwards.
        assert stale[0].time >= FAULT_ON + DEFAULT_METRICS_TIMEOUT_S
        assert controller.overruns >= 1
    # The law only ever saw fresh samples: none during the fault.
    law: RampLaw = run["law"]
    assert not any(s.stale for s in law.samples)
    # (A tick at the instant of the last stale observation may have run just after it.)
    assert not any(FAULT_ON <= s.time < stale[-1].time for s in law.samples)
    assert run["faults"].metrics_faulted >= 1


def test_metrics_slower_than_the_tick_but_within_the_timeout_delay_decisions_only(
    engine: str,
) -> None:
    # Scrapes take 2 s against a 0.5 s tick: each answer is late but good, so the controller
    # acts on every one of them (never stale) and skips the ticks it could not run.
    run = vtime.run(_batch(Faults(metrics="slow", metrics_delay_s=2.0), engine=engine))
    _check_batch_completed(run)
    controller = run["stats"].controller
    assert controller.errors == 0 and not controller.stale
    assert not any(o.stale for o in run["observations"])
    assert controller.overruns >= 3
    law: RampLaw = run["law"]
    during = [s.time for s in law.samples if FAULT_ON < s.time < FAULT_OFF]
    # One decision per late answer: ticks 2 s apart, not piled up.
    assert during and all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(during))


def test_a_counter_reset_mid_batch_gives_no_negative_or_huge_deltas(engine: str) -> None:
    run = vtime.run(_batch(None, resets=(FAULT_ON, FAULT_OFF), engine=engine))
    _check_batch_completed(run)
    assert run["faults"].counter_resets == 2
    controller = run["stats"].controller
    assert controller.errors == 0 and not controller.stale
    law: RampLaw = run["law"]
    samples = law.samples
    assert any(s.time > FAULT_OFF for s in samples)  # the batch ran on past both resets
    engine = run["engine"]
    totals = {
        "generation_tokens": engine.generation_tokens,
        "prompt_tokens": engine.prompt_tokens,
        "prefix_queries": engine.prefix_cache_queries,
        "prefix_hits": engine.prefix_cache_hits,
        "preemptions": engine.num_preemptions,
    }
    for name, total in totals.items():
        deltas = [getattr(s, name) for s in samples]
        assert min(deltas) >= 0, f"{name}: negative interval delta {min(deltas)}"
        # Never more than the server really did: a reset is not read as a huge jump.
        assert sum(deltas) <= total, f"{name}: deltas sum to {sum(deltas)} > {total}"
    assert all(s.prefix_hit_rate is None or 0 <= s.prefix_hit_rate <= 1 for s in samples)
    # The window kept moving across both resets: a reset is data, not an outage.
    for at in (FAULT_ON, FAULT_OFF):
        assert any(at < s.time <= at + INTERVAL_S for s in samples)
    assert sum(s.generation_tokens for s in samples) > 0


def test_a_truncated_metrics_page_is_stale_and_gives_no_huge_deltas(engine: str) -> None:
    run = vtime.run(_batch(Faults(metrics="truncated"), engine=engine))
    _check_batch_completed(run)
    law: RampLaw = run["law"]
    engine = run["engine"]
    # What the server really did, over the whole batch, can be no less than the sum of the
    # interval deltas the controller was given.
    assert sum(s.prompt_tokens for s in law.samples) <= engine.prompt_tokens
    assert sum(s.prefix_queries for s in law.samples) <= engine.prefix_cache_queries
    # And an incomplete page is not data to act on.
    assert any(o.stale for o in run["observations"])

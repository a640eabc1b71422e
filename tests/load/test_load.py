"""Load: 5,000 agents in one process complete, leak no slot, and keep bookkeeping O(agents).

The batch is the benchmark's own (``benchmarks/load.py``, loaded from its file so the test and
the benchmark measure the same thing): real LangGraph graphs, ``ChatOpenAI`` through the
simulator on ``httpx.ASGITransport``, ``ConcurGate.abatch``, all in virtual time. Sizes of the
gate's, the callback handler's and the window's per-agent structures are sampled during the run
(every 0.1 simulated seconds) and read again at the end. Memory per agent is not asserted: RSS
is noisy on a shared machine and belongs to the benchmark.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from concur_langgraph import Sample
from concur_langgraph.testing.vtime_fixtures import virtual_time

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark() -> ModuleType:
    name = "concur_load_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load = _load_benchmark()


def _assert_complete_and_clean(run: Any, agents: int) -> None:
    """Every agent came back with all its steps done; nothing per-agent is left anywhere."""
    record = run.record
    assert len(run.outputs) == agents
    failed = [o for o in run.outputs if isinstance(o, BaseException)]
    assert failed == []
    for output, steps in zip(run.outputs, run.plans_steps, strict=True):
        assert output["step"] == steps
        assert isinstance(output["messages"][-1], AIMessage)
    assert record["llm_calls"] == sum(run.plans_steps)
    assert record["completed"] == agents
    # No slot leaks: every per-agent map and queue is empty, the window holds nothing.
    assert record["leaks"] == {}
    assert {key: record["bookkeeping_end"][key] for key in load.PER_AGENT_KEYS} == dict.fromkeys(
        load.PER_AGENT_KEYS, 0
    )
    window = record["window_end"]
    assert (window["holders"], window["waiting_new"], window["waiting_parked"]) == (0, 0, 0)
    assert window["admitted_total"] >= agents
    # No task outlives the batch (controller, progress, engine loop, agents' runs).
    assert record["tasks_left"] == 0
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []


@virtual_time
@pytest.mark.timeout(300)  # ~20 s of wall time on a quiet 2-core machine; generous when loaded
async def test_5000_agents_complete_with_no_slot_leaks() -> None:
    agents, window = 5000, 128
    settings = load.LoadSettings(
        agents=agents,
        steps_min=1,
        steps_max=1,
        policy="fixed",
        fixed_window=window,
        warmup_agents=0,
    )
    run = await load.run_load(settings)
    _assert_complete_and_clean(run, agents)
    peak = run.record["bookkeeping_peak"]
    assert run.record["bookkeeping_samples"] > 10
    # Every agent registers at its first LLM call and waits there: the gate's map reaches N,
    # and never more; the window never holds more than its size; the rest queue in FIFO.
    assert peak["gate_agents"] == agents
    assert peak["handler_roots"] <= agents
    assert peak["handler_agent_refs"] <= agents
    assert peak["window_holders"] <= window
    assert 0 < peak["window_waiting_new"] <= agents - window
    # The handler's run map: no agent of the crowd carries more runs than one agent alone
    # does on the same graph, so the map is at most that constant times N.
    alone = await _runs_per_agent_peak(1)
    assert 0 < peak["handler_runs_per_agent_max"] <= alone
    assert peak["handler_run_map"] <= alone * agents


@dataclass
class _Churn:
    """A law that alternates between a wide and a narrow window every tick: agents are admitted
    in bursts, and shrinks park holders at their next step (the paths that could leak)."""

    wide: int
    narrow: int

    def next_window(self, window: int, sample: Sample) -> int:
        return self.narrow if window >= self.wide else self.wide


@virtual_time
async def test_parks_and_resumes_at_scale_leave_nothing_behind() -> None:
    agents = 150
    settings = load.LoadSettings(
        agents=agents, steps_min=3, steps_max=3, policy="law", warmup_agents=0
    )
    run = await load.run_load(
        settings,
        law=_Churn(wide=100, narrow=10),
        gate_options={"interval_s": 0.5, "initial_window": 100, "max_window": 100},
    )
    _assert_complete_and_clean(run, agents)
    record = run.record
    # The churn did exercise parking and resumption, so the cleanup above covered them.
    assert record["parks"] > 0
    assert record["window_end"]["resumed_total"] > 0
    assert record["bookkeeping_peak"]["window_waiting_parked"] > 0
    assert record["bookkeeping_peak"]["gate_agents"] <= agents


async def _runs_per_agent_peak(steps: int) -> int:
    settings = load.LoadSettings(
        agents=1, steps_min=steps, steps_max=steps, policy="fixed", fixed_window=1, warmup_agents=0
    )
    run = await load.run_load(settings)
    assert [o for o in run.outputs if isinstance(o, BaseException)] == []
    peak: int = run.record["bookkeeping_peak"]["handler_runs_per_agent_max"]
    return peak


@virtual_time
async def test_handler_run_map_does_not_grow_with_an_agents_steps() -> None:
    two, ten = await _runs_per_agent_peak(2), await _runs_per_agent_peak(10)
    assert two > 0
    assert ten == two


def test_sweep_fit_tells_linear_from_quadratic_growth() -> None:
    sizes = (500, 1000, 2000, 5000)
    linear = [{"agents": n, "rss_growth_bytes": 30_000_000 + 100_000 * n} for n in sizes]
    fit = load.sweep_fit(linear)
    assert fit["bytes_per_agent"] == 100_000
    assert fit["r2"] == 1.0
    quadratic = [{"agents": n, "rss_growth_bytes": 40 * n * n} for n in sizes]
    ratio = load.sweep_fit(quadratic)["per_agent_ratio_largest_to_smallest"]
    assert ratio == pytest.approx(10.0, rel=1e-3)
    # The linear case's per-agent cost falls towards the slope as the fixed part spreads.
    assert fit["per_agent_ratio_largest_to_smallest"] < 1.0


def test_settings_name_the_bad_field() -> None:
    from concur_langgraph import ConfigError

    with pytest.raises(ConfigError, match="steps_max"):
        load.LoadSettings(steps_min=3, steps_max=2)
    with pytest.raises(ConfigError, match="agents"):
        load.LoadSettings(agents=0)
    with pytest.raises(ConfigError, match="law"):
        asyncio.run(load.run_load(load.LoadSettings(policy="law")))

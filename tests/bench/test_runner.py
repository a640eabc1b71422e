"""End-to-end benchmark runs on the simulator in virtual time: complete, exact, repeatable."""

from __future__ import annotations

import pytest

from concur_langgraph._errors import ConfigError
from concur_langgraph._laws import ConcurLaw, FixedLaw
from concur_langgraph.bench._bound import lower_bound
from concur_langgraph.bench._policies import LAWS, parse_policy, sweep_windows
from concur_langgraph.bench._runner import (
    RECORD_KEYS,
    SERIES_KEYS,
    SimBackend,
    UrlBackend,
    run_benchmark,
    run_one,
)
from concur_langgraph.bench._workload import Workload

TINY = SimBackend.preset("test-tiny")


def _without_wall(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != "wall_s"}


@pytest.mark.parametrize("policy", ["none", "static:2", "concur"])
def test_record_is_complete_and_repeatable(tiny_workload: Workload, policy: str) -> None:
    first = run_one(tiny_workload, policy, TINY)
    second = run_one(tiny_workload, policy, TINY)
    assert set(RECORD_KEYS) <= set(first)
    # Virtual time: the same run gives the same numbers, series included.
    assert _without_wall(first) == _without_wall(second)

    plans = tiny_workload.plans()
    assert first["workload"] == "tiny"
    assert first["policy"] == policy
    assert first["backend"] == "sim:test-tiny"
    assert first["agents_ok"] == tiny_workload.agents
    assert first["agents_failed"] == 0
    assert first["errors"] == []
    assert first["generated_tokens"] == sum(sum(p.output_tokens) for p in plans)
    assert first["llm_calls"] == sum(p.steps for p in plans)
    assert first["tokens_per_s"] == pytest.approx(first["generated_tokens"] / first["makespan_s"])
    assert first["prompt_tokens_computed"] > 0
    assert 0 <= first["prefix_hit_rate"] <= 1
    assert first["lower_bound_s"] == lower_bound(tiny_workload, TINY.config).bound_s
    assert first["lower_bound_s"] <= first["makespan_s"]

    series = first["series"]
    assert list(series) == list(SERIES_KEYS)
    lengths = {len(column) for column in series.values()}
    assert len(lengths) == 1
    # One row per tick from t = 0, plus the state at the end.
    assert lengths.pop() == int(first["makespan_s"]) + 2
    assert series["t"][:3] == [0.0, 1.0, 2.0]
    assert series["finished"][-1] == tiny_workload.agents
    assert all(0 <= u <= 1 for u in series["kv_usage"])


def test_policies_shape_the_window(tiny_workload: Workload) -> None:
    none = run_one(tiny_workload, "none", TINY)
    static = run_one(tiny_workload, "static:2", TINY)
    adaptive = run_one(tiny_workload, "concur", TINY)
    assert none["window_peak"] is None and none["window_mean"] is None
    # Without a gate every agent is active from the start.
    assert none["series"]["active"][0] == tiny_workload.agents
    assert static["window_peak"] == 2 and static["window_mean"] == 2.0
    assert max(static["series"]["active"]) <= 2
    # The paper's law starts at W0 = 4 and grows while the cache is under-used.
    assert adaptive["series"]["window"][0] == 4
    assert adaptive["window_peak"] >= 4
    # Two agents at a time cannot beat everything at once on this workload.
    assert static["makespan_s"] > none["makespan_s"]


def test_static_sweep_reports_the_best_window(tiny_workload: Workload) -> None:
    records = run_benchmark(tiny_workload, ["static-sweep"], TINY, sweep=[1, 3, 6])
    assert [r["policy"] for r in records] == ["static:1", "static:3", "static:6", "static-sweep"]
    runs, summary = records[:3], records[3]
    best = min(runs, key=lambda r: r["makespan_s"])
    assert summary["makespan_s"] == best["makespan_s"]
    assert summary["best_k"] == int(best["policy"].removeprefix("static:"))
    assert summary["sweep"] == {r["policy"]: r["makespan_s"] for r in runs}


def test_lower_bound_parts(tiny_workload: Workload) -> None:
    bound = lower_bound(tiny_workload, TINY.config)
    plans = tiny_workload.plans()
    assert bound.critical_path_s >= max(sum(p.tool_latency_s) for p in plans)
    assert bound.decode_tokens == sum(sum(p.output_tokens) - p.steps for p in plans)
    assert bound.prefill_tokens == tiny_workload.system_prompt_tokens + sum(
        p.task_prompt_tokens + sum(p.observation_tokens) for p in plans
    )
    assert bound.bound_s == max(bound.work_s, bound.critical_path_s)


def test_policy_names(tiny_workload: Workload) -> None:
    assert parse_policy("none").make_law() is None
    assert parse_policy("static:8").make_law() == FixedLaw(8)
    assert isinstance(parse_policy("concur").make_law(), ConcurLaw)
    assert "concur" in LAWS
    auto = parse_policy("auto")
    # auto is the gate's own default (law=None), whatever that becomes.
    assert auto.auto and auto.gated and auto.make_law() is None
    with pytest.raises(ConfigError, match="static:K needs an integer K >= 1"):
        parse_policy("static:0")
    with pytest.raises(ConfigError, match="unknown policy 'fast'; known: none, static:K"):
        parse_policy("fast")
    with pytest.raises(ConfigError, match="static-sweep is several runs"):
        run_one(tiny_workload, "static-sweep", TINY)
    assert sweep_windows(10) == [2, 4, 8, 10]


def test_url_backend_validates() -> None:
    with pytest.raises(ConfigError, match="url: expected an http"):
        UrlBackend(url="localhost:8000")
    assert UrlBackend(url="http://h:1/v1/").root == "http://h:1"

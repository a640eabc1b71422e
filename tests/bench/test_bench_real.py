"""``benchmarks/bench_real.py`` (``make bench-real``) on synthetic records: which policies run,
in which order, what an interrupted run resumes, the medians and spreads of the tables, the
figure and the generated section of docs/benchmarks.md. No server: the runs themselves are
``concur bench``'s, tested elsewhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import pytest

from concur_langgraph import FixedLaw
from concur_langgraph.bench import _policies
from concur_langgraph.bench._runner import SimBackend, run_one
from concur_langgraph.bench._workload import load_workload
from concur_langgraph.sim import get_preset
from concur_langgraph.testing.vllm_cpu import MODELS

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, file: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


bench_real = _load("concur_bench_real_benchmark", "bench_real.py")


def record(
    policy: str,
    makespan: float,
    *,
    workload: str = "medium-24",
    repeat: int = 0,
    computed: int = 1000,
    hit: float = 0.5,
    preemptions: int = 0,
    window: float | None = None,
    failed: int = 0,
) -> dict[str, Any]:
    series = {
        "t": [0.0, 1.0, 2.0],
        "kv_usage": [0.1, 0.9, 0.5],
        "hit_rate": [None, 0.4, 0.6],
        "window": [window, window, window],
        "active": [3, 3, 1],
    }
    return {
        "workload": workload,
        "policy": policy,
        "backend": "vllm:http://x",
        "repeat": repeat,
        "makespan_s": makespan,
        "prompt_tokens_computed": computed,
        "prefix_hit_rate": hit,
        "preemptions": preemptions,
        "window_mean": window,
        "window_peak": None if window is None else int(window),
        "agents": 24,
        "agents_ok": 24 - failed,
        "agents_failed": failed,
        "errors": ["HTTPStatusError: 400"] if failed else [],
        "status": "failed" if failed else "ok",
        "series": series,
        "load_avg_1m": [0.5, 1.5],
        "date": "2026-12-02T20:00:00+00:00",
        "machine": "Test CPU, 2 cores",
    }


# -- which runs, in which order ----------------------------------------------------------------


def test_default_policies_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench_real.default_policies() == [
        "none",
        "static:8",
        "static:12",
        "static:16",
        "admit",
        "concur",
        "auto",
        *sorted(_policies.PEERS),
    ]
    # A peer registered later (ThunderAgent, say) joins with no change to the script.
    monkeypatch.setattr(_policies, "PEERS", MappingProxyType({"thunderagent": lambda: FixedLaw(4)}))
    policies = bench_real.default_policies((8, 3))
    assert policies == ["none", "static:3", "static:8", "admit", "concur", "auto", "thunderagent"]
    assert _policies.parse_policy("thunderagent").make_law() == FixedLaw(4)


def test_each_repeat_rotates_the_policy_order() -> None:
    policies = ["none", "static:3", "concur"]
    assert bench_real.rotated(policies, 0) == policies
    assert bench_real.rotated(policies, 1) == ["static:3", "concur", "none"]
    assert bench_real.rotated(policies, 4) == ["static:3", "concur", "none"]
    plan = bench_real.schedule(["a", "b"], policies, 2)
    # Repeats outermost, every policy once per workload and repeat.
    assert plan[:3] == [("a", "none", 0), ("a", "static:3", 0), ("a", "concur", 0)]
    assert plan[6:9] == [("a", "static:3", 1), ("a", "concur", 1), ("a", "none", 1)]
    assert len(plan) == len(set(plan)) == 12


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    bench_real.append_record(path, record("none", 100.0))
    bench_real.append_record(path, record("static:3", 90.0, failed=2))
    # A writer killed mid-line leaves half a record: it is ignored, the rest is kept.
    with path.open("a") as out:
        out.write('{"workload": "medium-24", "pol')
    records = bench_real.read_records(path)
    assert [r["policy"] for r in records] == ["none", "static:3"]
    plan = bench_real.schedule(["medium-24"], ["none", "static:3", "concur"], 1)
    # Done runs are skipped; a run with failed agents is run again.
    assert bench_real.pending(plan, records) == [
        ("medium-24", "static:3", 0),
        ("medium-24", "concur", 0),
    ]
    # The newest record of a run counts; the next append drops the half line first.
    bench_real.append_record(path, record("static:3", 95.0))
    records = bench_real.read_records(path)
    assert [r["policy"] for r in records] == ["none", "static:3", "static:3"]
    assert bench_real.latest(records)[("medium-24", "static:3", 0)]["makespan_s"] == 95.0


def test_records_keep_their_series_compactly(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    rec = record("none", 100.0)
    rec["series"]["kv_usage"] = [0.123456789, None]
    bench_real.append_record(path, rec)
    (back,) = bench_real.read_records(path)
    assert back["series"]["kv_usage"] == [0.1235, None]
    assert back["makespan_s"] == 100.0


def test_a_corrupt_record_before_the_last_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("nonsense\n" + json.dumps(record("none", 1.0)) + "\n")
    with pytest.raises(bench_real.ConfigError, match=r"records\.jsonl:1"):
        bench_real.read_records(path)


# -- summaries ---------------------------------------------------------------------------------


def test_medians_spreads_and_speedups() -> None:
    records = [
        record("none", 120.0, repeat=0, computed=3000, hit=0.1, preemptions=9),
        record("none", 100.0, repeat=1, computed=2000, hit=0.2, preemptions=5),
        record("none", 110.0, repeat=2, computed=2500, hit=0.15, preemptions=7),
        record("static:3", 80.0, repeat=0, computed=900, hit=0.7, window=3.0),
        record("static:3", 88.0, repeat=1, computed=1100, hit=0.6, window=3.0),
        record("static:3", 84.0, repeat=2, computed=1000, hit=0.65, window=3.0),
    ]
    rows = {r.policy: r for r in bench_real.summarize(records)}
    none, static = rows["none"], rows["static:3"]
    assert (none.makespan_s.median, none.makespan_s.low, none.makespan_s.high) == (
        110.0,
        100.0,
        120.0,
    )
    assert none.preemptions.median == 7
    assert static.speedup == pytest.approx(110.0 / 84.0)
    assert none.speedup == pytest.approx(1.0)
    assert static.window_mean.median == 3.0
    assert none.window_mean is None
    table = bench_real.markdown_tables(bench_real.summarize(records))
    assert "| none | 3 | 110.0 (100.0-120.0) | 1.00 | 2,500 (2,000-3,000) |" in table
    assert "| static:3 | 3 | 84.0 (80.0-88.0) | 1.31 |" in table
    assert "Fastest first (medians): static:3, none" in table


def test_a_policy_with_a_failed_run_gets_no_median() -> None:
    records = [
        record("none", 100.0),
        record("static:3", 50.0, repeat=0),
        record("static:3", 40.0, repeat=1, failed=3),
    ]
    rows = {r.policy: r for r in bench_real.summarize(records)}
    assert rows["static:3"].makespan_s is None
    assert rows["static:3"].speedup is None
    table = bench_real.markdown_tables(bench_real.summarize(records))
    assert "| static:3 | 2 | FAILED 1/2 runs (3 agents) | - |" in table
    assert "Fastest first (medians): none" in table


def test_no_speedup_without_a_valid_none() -> None:
    records = [record("none", 100.0, failed=1), record("static:5", 90.0)]
    rows = {r.policy: r for r in bench_real.summarize(records)}
    assert rows["static:5"].speedup is None


def test_tables_follow_the_policy_order_given() -> None:
    records = [record("concur", 1.0), record("none", 2.0), record("static:3", 3.0)]
    rows = bench_real.summarize(records, ["none", "static:3", "concur"])
    assert [r.policy for r in rows] == ["none", "static:3", "concur"]


def test_median_run_is_the_middle_one() -> None:
    group = [record("none", 120.0), record("none", 100.0), record("none", 110.0)]
    assert bench_real.median_run(group)["makespan_s"] == 110.0
    assert bench_real.median_run(group[:2])["makespan_s"] == 100.0


# -- outputs -----------------------------------------------------------------------------------


def test_plot_writes_one_figure_per_workload(tmp_path: Path) -> None:
    records = [record("none", 100.0), record("static:3", 80.0, window=3.0)]
    path = bench_real.plot_workload(records, tmp_path / "w.png", title="w")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing to draw (every run failed): no file, no warning.
    assert (
        bench_real.plot_workload([record("none", 1.0, failed=1)], tmp_path / "x.png", title="x")
        is None
    )
    assert not (tmp_path / "x.png").exists()


def test_docs_section_is_replaced_between_its_markers(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        f"# Page\n\nbefore\n\n{bench_real.BEGIN}\nold tables\n{bench_real.END}\nafter\n"
    )
    bench_real.write_docs(docs, f"{bench_real.BEGIN}\nnew tables\n{bench_real.END}")
    text = docs.read_text()
    assert "old tables" not in text
    assert text.startswith("# Page\n\nbefore\n\n")
    assert text.endswith(f"new tables\n{bench_real.END}\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("# Page\n")
    with pytest.raises(bench_real.ConfigError, match="markers"):
        bench_real.write_docs(bare, "x")


def test_report_only_writes_tables_figures_and_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "records.jsonl"
    for rec in (
        record("none", 110.0),
        record("static:3", 80.0, window=3.0),
        record("none", 60.0, workload="medium-long"),
    ):
        bench_real.append_record(path, rec)
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{bench_real.BEGIN}\n{bench_real.END}\n")
    out = tmp_path / "out"
    argv = ["--report-only", "--records", str(path), "--out", str(out), "--docs", str(docs)]
    argv += ["--policies", "none,static:3", "--note", "Preliminary: one run each."]
    argv += ["--workloads", "medium-24,medium-long"]
    assert bench_real.main(argv) == 0
    assert (out / "medium-24.png").exists() and (out / "medium-long.png").exists()
    text = docs.read_text()
    assert "Generated by `python benchmarks/bench_real.py --report-only" in text
    assert "machine: Test CPU, 2 cores" in text
    assert f"Raw records: `{path}`" in text
    assert "from 3 runs (2026-12-02)" in text
    assert f"{bench_real.BEGIN}\n\n**Preliminary: one run each.**\n\nGenerated by" in text
    assert "| static:3 | 1 | 80.0 | 1.38 |" in text
    assert "**medium-long**" in text
    assert "| static:3 | 1 | 80.0 | 1.38 |" in (out / "report.md").read_text()
    assert "| none | 1 | 110.0 |" in capsys.readouterr().out


def test_report_exits_1_when_a_run_failed(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    bench_real.append_record(path, record("none", 110.0, failed=2))
    argv = ["--report-only", "--records", str(path), "--out", str(tmp_path), "--no-docs"]
    argv += ["--workloads", "medium-24"]
    assert bench_real.main([*argv, "--policies", "none"]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "none,fastest"], "unknown policy 'fastest'"),
        (["--workloads", "nope"], "workload: 'nope'"),
        (["--repeats", "0"], "--repeats"),
        (["--sweep", "a,b"], "--sweep"),
    ],
)
def test_bad_settings_exit_2_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [*argv, "--records", str(tmp_path / "r.jsonl"), "--no-docs"]
    assert bench_real.main(argv) == 2
    assert message in capsys.readouterr().err


# -- the workloads -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", bench_real.DEFAULT_WORKLOADS)
def test_pressure_workloads_fit_the_medium_server(name: str) -> None:
    workload = load_workload(name)
    medium = MODELS["medium"]
    workload.check_fits(medium.default_max_model_len, server="the medium server")
    workload.check_fits(get_preset("cpu-medium").max_model_len, server="sim preset cpu-medium")
    # Pressure: the agents' final contexts together are several times the 8,192-token cache.
    finals = [
        workload.system_prompt_tokens
        + plan.task_prompt_tokens
        + sum(plan.output_tokens)
        + sum(plan.observation_tokens)
        for plan in workload.plans()
    ]
    capacity = medium.default_kv_cache_memory_bytes // medium.kv_bytes_per_token
    assert sum(finals) > 5 * capacity
    assert max(finals) < medium.default_max_model_len


def test_a_pressure_workload_runs_on_the_simulator() -> None:
    rec = run_one(load_workload("medium-24"), "static:5", SimBackend.preset("cpu-medium"))
    assert rec["status"] == "ok"
    assert rec["agents_ok"] == 24
    assert rec["llm_calls"] == 24 * 6
    assert rec["window_peak"] == 5
    # Both counts of prompt work are there: vLLM's counters leave re-prefills after a
    # preemption out, the engine's own counter does not.
    assert 0 < rec["prompt_tokens_uncached"] <= rec["prompt_tokens_computed"]

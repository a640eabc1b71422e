"""``benchmarks/run_all.py`` (the docs' tables): failed runs are marked, never compared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from concur_langgraph.bench._runner import SimBackend, run_one
from concur_langgraph.bench._workload import Workload
from concur_langgraph.sim import Faults

ROOT = Path(__file__).resolve().parents[2]
TINY = SimBackend.preset("test-tiny")
FAULTY = SimBackend(
    config=TINY.config, name="test-tiny", faults=Faults(chat="error", chat_status=400, chat_next=2)
)


def _load_run_all() -> ModuleType:
    name = "concur_run_all_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()


@pytest.fixture
def failed(tiny_workload: Workload) -> dict[str, Any]:
    return run_one(tiny_workload, "none", FAULTY)


@pytest.fixture
def ok(tiny_workload: Workload) -> dict[str, Any]:
    return run_one(tiny_workload, "static:2", TINY)


def test_real_table_marks_a_policy_with_a_failed_run(
    failed: dict[str, Any], ok: dict[str, Any]
) -> None:
    # Real-server records, grouped by policy over repeats: one of two `none` runs failed.
    none_ok = dict(ok, policy="none", backend="vllm:x")
    records = [dict(failed, backend="vllm:x"), none_ok, dict(ok, backend="vllm:x")]
    lines = run_all.real_table(records).splitlines()
    none_row = [c.strip() for c in lines[2].split("|")]
    static_row = [c.strip() for c in lines[3].split("|")]
    assert none_row[3:8] == ["none", "2", "FAILED 1/2 runs (2/12 agents)", "-", "-"]
    assert none_row[10] == "2"
    # The static runs are measured, but get no speed-up over a failed `none`.
    assert static_row[3:6] == ["static:2", "1", f"{ok['makespan_s']:.1f}"]
    assert static_row[7] == "-"


def test_run_all_refuses_a_workload_its_preset_cannot_hold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run_all, "SUITE", (run_all.Suite("light-8", "cpu-tiny", (2,)),))
    assert run_all.main(["--out", str(tmp_path), "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert "run_all: error: workload light-8: an agent's context can reach 9,144 tokens" in err
    assert "max_model_len is 2048 (sim preset cpu-tiny)" in err
    assert not (tmp_path / "records.jsonl").exists()


def test_run_all_writes_failed_runs_marked_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    failed: dict[str, Any],
    ok: dict[str, Any],
) -> None:
    def run_sim(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return [failed, dict(ok, backend=failed["backend"])]

    monkeypatch.setattr(run_all, "run_sim", run_sim)
    assert run_all.main(["--out", str(tmp_path), "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert "| none | FAILED 2/6 agents | - | - | - |" in captured.out
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| none | FAILED 2/6 agents | - | - | - |" in report
    assert len((tmp_path / "records.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert (
        "run_all: error: runs with failed agents, marked FAILED and not compared: "
        "tiny none (FAILED 2/6 agents)"
    ) in captured.err

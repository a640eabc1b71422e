"""Reports (table + PNG), ``concur bench`` and ``concur demo`` on a tiny workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concur_langgraph import cli
from concur_langgraph.bench._report import load_records, markdown_table, write_report
from concur_langgraph.bench._runner import RECORD_KEYS, SimBackend, run_one
from concur_langgraph.bench._workload import Workload

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def records(tiny_workload: Workload) -> list[dict[str, object]]:
    work = tiny_workload
    backend = SimBackend.preset("test-tiny")
    return [run_one(work, p, backend) for p in ("none", "static:2")]


def test_table_has_a_row_per_run_and_ratios(records: list[dict[str, object]]) -> None:
    table = markdown_table(records)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| workload | backend | policy | makespan (s) | x LB")
    assert len(lines) == 2 + len(records)
    none, static = records
    assert "| tiny | sim:test-tiny | none |" in lines[2]
    cells = [c.strip() for c in lines[3].split("|")]
    assert cells[3] == "static:2"
    ratio = float(none["makespan_s"]) / float(static["makespan_s"])  # type: ignore[arg-type]
    assert cells[6] == f"{ratio:.2f}"
    assert cells[11] == "2 / 2.0"


def test_report_writes_markdown_and_png(records: list[dict[str, object]], tmp_path: Path) -> None:
    report, figures = write_report(records, tmp_path)
    assert report.read_text(encoding="utf-8").startswith("# Benchmark report")
    assert [f.name for f in figures] == ["tiny__sim_test-tiny.png"]
    assert figures[0].read_bytes()[:8] == PNG
    assert f"]({figures[0].name})" in report.read_text(encoding="utf-8")


def test_cli_bench_json_to_stdout_then_report(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--workload", str(tiny_file), "--policy", "none", "--policy", "static:3"]
    code = cli.main([*argv, "--sim-preset", "test-tiny", "--json", "-", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    assert [r["policy"] for r in parsed] == ["none", "static:3"]
    for record in parsed:
        assert set(RECORD_KEYS) <= set(record)
        assert record["agents_ok"] == 6

    records_file = tmp_path / "records.jsonl"
    records_file.write_text(out, encoding="utf-8")
    assert load_records(records_file) == parsed
    assert cli.main(["bench", "report", str(records_file), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert (tmp_path / "rep" / "tiny__sim_test-tiny.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--policy", "none", "--sim-preset", "nope"], "unknown preset 'nope'"),
        (["--policy", "none", "--sweep", "0,2"], "--sweep: windows must be integers >= 1"),
        (["--policy", "none", "--model", "m"], "--model: only used with --url"),
    ],
)
def test_cli_bench_errors_exit_2(
    tiny_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = cli.main(["bench", "--workload", str(tiny_file), *extra, "--json", "-", "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_bench_needs_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--workload", "light-8"]) == 2
    assert "give --workload, at least one --policy, and --json" in capsys.readouterr().err


def test_demo_prints_the_comparison_and_writes_the_plot(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo-out"
    argv = ["demo", "--workload", str(tiny_file), "--sim-preset", "test-tiny"]
    assert cli.main([*argv, "--out", str(out), "--policy", "static:2"]) == 0
    printed = capsys.readouterr().out
    for row in ("makespan (s)", "tokens/s", "prompt tokens computed", "prefix hit rate"):
        assert row in printed
    assert "preemptions" in printed
    assert "ConcurGate (static:2)" in printed
    plot = out / "demo.png"
    assert plot.read_bytes()[:8] == PNG
    assert "demo.png" in printed


def test_demo_with_the_default_law_reruns_the_batch_with_a_warm_start(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--workload", str(tiny_file), "--sim-preset", "test-tiny"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "ConcurGate (auto), rerun, warm start:" in printed
    # Six small agents fit test-tiny's cache: the measured profile starts the rerun open.
    assert "warm start: the first gated batch measured" in printed
    assert "the rerun starts open" in printed
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG


def test_cli_bench_unreachable_url_exits_2(
    tiny_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 9 on loopback (discard) refuses connections: a clear message, no traceback.
    argv = ["bench", "--workload", str(tiny_file), "--policy", "none"]
    code = cli.main([*argv, "--url", "http://127.0.0.1:9", "--json", "-", "--quiet"])
    assert code == 2
    assert "url: cannot list the models of http://127.0.0.1:9" in capsys.readouterr().err

"""Reports (table + PNG), ``concur bench`` and ``concur demo`` on a tiny workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph import cli
from concur_langgraph.bench._report import (
    load_records,
    markdown_table,
    plot_records,
    write_report,
)
from concur_langgraph.bench._runner import RECORD_KEYS, SimBackend, run_one
from concur_langgraph.bench._workload import Workload
from concur_langgraph.sim import Faults

PNG = b"\x89PNG\r\n\x1a\n"
# The first two chat calls get a 400: two of the tiny batch's six agents fail.
FAULTS = ["--fault", "chat=error", "--fault", "chat_status=400", "--fault", "chat_next=2"]
FIRST_ERROR = "OpenAIInvalidRequestError: Error code: 400 - injected fault"


def _failed_run(work: Workload, policy: str) -> dict[str, Any]:
    """A run of ``policy`` whose two first calls fail, in the group of the healthy runs."""
    faults = Faults(chat="error", chat_status=400, chat_next=2)
    backend = SimBackend.preset("test-tiny")
    record = run_one(work, policy, SimBackend(config=backend.config, name="x", faults=faults))
    return dict(record, backend=backend.label)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("|")]


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
        (["--policy", "none", "--fault", "chat=oops"], "chat: must be one of"),
        (
            ["--policy", "none", "--fault", "metrics=down", "--url", "http://127.0.0.1:9"],
            "--fault: only used with the simulator",
        ),
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


def test_demo_runs_the_batch_plain_then_with_the_default_law(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--workload", str(tiny_file), "--sim-preset", "test-tiny"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "plain graph.abatch:" in printed and "ConcurGate (auto):" in printed
    assert "rerun" not in printed  # the warm-start rerun was AdmitLaw's, no longer the default
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG


def test_cli_bench_unreachable_url_exits_2(
    tiny_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 9 on loopback (discard) refuses connections: a clear message, no traceback.
    argv = ["bench", "--workload", str(tiny_file), "--policy", "none"]
    code = cli.main([*argv, "--url", "http://127.0.0.1:9", "--json", "-", "--quiet"])
    assert code == 2
    assert "url: cannot list the models of http://127.0.0.1:9" in capsys.readouterr().err


def test_table_marks_a_failed_none_and_compares_nothing_with_it(
    tiny_workload: Workload, records: list[dict[str, Any]]
) -> None:
    failed, static = _failed_run(tiny_workload, "none"), records[1]
    assert failed["status"] == "failed"
    lines = markdown_table([failed, static]).splitlines()
    none_row, static_row = _cells(lines[2]), _cells(lines[3])
    assert none_row[3:8] == ["none", "FAILED 2/6 agents", "-", "-", "-"]
    assert none_row[12] == "4 / 2"
    # The healthy run keeps its own bound, but gets no speed-up over a failed baseline.
    x_lb = float(static["makespan_s"]) / float(static["lower_bound_s"])
    assert static_row[3:7] == ["static:2", f"{float(static['makespan_s']):.1f}", f"{x_lb:.2f}", "-"]
    assert lines[4:] == [
        "",
        "FAILED: runs with failed agents. Their makespans are not compared (no x LB, no "
        "speed-up, never the best window), nor is any run compared with a failed `none`. "
        "First error of each:",
        "",
        f"- tiny on sim:test-tiny, none: {FIRST_ERROR}",
    ]


def test_table_gives_a_failed_run_no_speed_up(
    tiny_workload: Workload, records: list[dict[str, Any]]
) -> None:
    none, failed = records[0], _failed_run(tiny_workload, "static:2")
    lines = markdown_table([none, failed]).splitlines()
    assert _cells(lines[2])[6] == "1.00"
    assert _cells(lines[3])[3:8] == ["static:2", "FAILED 2/6 agents", "-", "-", "-"]


def test_report_and_plot_mark_failed_runs(
    tiny_workload: Workload,
    records: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from matplotlib.figure import Figure

    failed = _failed_run(tiny_workload, "none")
    report, figures = write_report([failed, records[1]], tmp_path)
    text = report.read_text(encoding="utf-8")
    assert "| none | FAILED 2/6 agents | - | - | - |" in text
    assert f"- tiny on sim:test-tiny, none: {FIRST_ERROR}" in text
    assert figures[0].read_bytes()[:8] == PNG

    legends: list[list[str]] = []
    styles: list[list[str]] = []
    save = Figure.savefig

    def keep(fig: Any, *args: Any, **kwargs: Any) -> None:
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        styles.append([line.get_linestyle() for line in fig.axes[0].get_lines()])
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot_records([failed, records[1]], tmp_path / "again")
    assert legends == [["none (FAILED 2/6 agents)", "static:2"]]
    assert styles == [["--", "-"]]


def test_cli_bench_with_failed_agents_writes_every_record_and_exits_1(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "records.jsonl"
    argv = ["bench", "--workload", str(tiny_file), "--policy", "none", "--policy", "static:3"]
    code = cli.main([*argv, "--sim-preset", "test-tiny", *FAULTS, "--json", str(out)])
    assert code == 1
    written = load_records(out)
    assert [(r["policy"], r["status"], r["agents_failed"]) for r in written] == [
        ("none", "failed", 2),
        ("static:3", "failed", 2),
    ]
    assert {r["backend"] for r in written} == {"sim:test-tiny+faults"}
    err = capsys.readouterr().err
    assert "| none | FAILED 2/6 agents | - | - | - |" in err
    assert (
        "concur bench: error: runs with failed agents, not comparable: none (FAILED 2/6 "
        f"agents), static:3 (FAILED 2/6 agents). First error: {FIRST_ERROR}. Every record is "
        'written (status "failed"); exit status 1.'
    ) in err

    # --quiet drops the table, never the error.
    assert cli.main([*argv, "--sim-preset", "test-tiny", *FAULTS, "--json", "-", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2
    assert "| workload |" not in captured.err
    assert "runs with failed agents, not comparable: none (FAILED 2/6 agents)" in captured.err


def test_cli_bench_refuses_a_workload_longer_than_max_model_len(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The command of issue 12: every agent of light-8 outgrew cpu-tiny and it exited 0.
    argv = ["bench", "--workload", "light-8", "--policy", "none", "--policy", "auto"]
    assert cli.main([*argv, "--sim-preset", "cpu-tiny", "--json", "-"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        "concur bench: error: workload light-8: an agent's context can reach 9,144 tokens"
    )
    assert "but the server's max_model_len is 2048 (sim preset cpu-tiny)" in captured.err

"""``concur run`` end to end in this process, on a graph without an LLM (``--law static:K``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph import cli

GRAPH = f"{Path(__file__).resolve().parent / 'plain_graph.py'}:graph"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _records(path: Path) -> dict[int, dict[str, Any]]:
    return {r["line"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_outcomes_are_recorded_and_failures_set_the_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        '{"n": 2}\n{"n": 1, "fail": true}\n{"n": 3, "ask": true}\n{"n": 3}\n', encoding="utf-8"
    )
    out = tmp_path / "r.jsonl"
    args = [GRAPH, str(tasks), "--law", "static:2", "--out", str(out), "--no-progress"]
    code, stdout, _ = _run(capsys, *args)
    assert code == 1
    assert "this run: 2 done, 1 failed, 1 interrupted (human-in-the-loop)" in stdout
    records = _records(out)
    assert records[1]["status"] == "ok" and records[1]["output"]["count"] == 2
    assert records[4]["output"]["count"] == 3
    assert records[2]["status"] == "error"
    assert records[2]["error"] == {
        "type": "plain_graph.TaskFailed",
        "message": "task with n=1 failed on purpose",
    }
    assert records[3]["status"] == "interrupted"
    assert records[3]["output"]["__interrupt__"][0]["value"] == "approve?"
    assert {r["thread_id"] for r in records.values()} == {f"r.jsonl/{i}" for i in range(1, 5)}

    # Every task has its result: a resume runs nothing and still reports the failure.
    code, stdout, _ = _run(capsys, *args, "--resume")
    assert code == 1
    assert "all 4 tasks already have a result" in stdout
    assert _records(out) == records


def test_skip_bad_runs_the_good_lines_and_records_nothing_for_the_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n{"n": "one"}\n\n{"n": 2\n{"n": 2}\n')
    out = tmp_path / "r.jsonl"
    args = [GRAPH, str(tasks), "--law", "static:4", "--out", str(out), "--no-progress"]
    code, stdout, stderr = _run(capsys, *args, "--skip-bad")
    assert code == 0
    assert f"skipping {tasks}:2: does not match the graph's input schema: n:" in stderr
    assert f"skipping {tasks}:4: not valid JSON" in stderr
    assert (
        "batch: 2 of 2 tasks have a result (2 ok, 0 error, 0 interrupted); 2 bad lines skipped"
        in stdout
    )
    assert sorted(_records(out)) == [1, 5]

    # Fixed lines run on --resume; the finished ones do not run again.
    tasks.write_text('{"n": 1}\n{"n": 1}\n\n{"n": 2}\n{"n": 2}\n')
    code, stdout, _ = _run(capsys, *args, "--resume")
    assert code == 0
    assert "this run: 2 done, 0 failed" in stdout
    assert "batch: 4 of 4 tasks have a result (4 ok, 0 error, 0 interrupted), 2 of them" in stdout
    assert sorted(_records(out)) == [1, 2, 4, 5]


def test_a_leftover_checkpoint_of_the_batch_is_not_silently_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    out = tmp_path / "r.jsonl"
    args = [GRAPH, str(tasks), "--law", "static:1", "--out", str(out), "--no-progress"]
    assert _run(capsys, *args)[0] == 0
    out.unlink()  # the results are gone but the checkpoints are not
    code, _, stderr = _run(capsys, *args)
    assert code == 2
    assert "already holds batch 'r.jsonl'" in stderr
    assert "pass --resume" in stderr
    assert not out.exists()
    # --resume takes the finished agent's output from its checkpoint without running it.
    code, stdout, _ = _run(capsys, *args, "--resume")
    assert code == 0 and "this run: 1 done" in stdout
    assert _records(out)[1]["output"]["count"] == 1


def test_a_changed_task_without_a_result_is_refused_by_the_durable_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    out = tmp_path / "r.jsonl"
    args = [GRAPH, str(tasks), "--law", "static:1", "--out", str(out), "--no-progress"]
    assert _run(capsys, *args)[0] == 0
    out.unlink()
    tasks.write_text('{"n": 2}\n')
    code, _, stderr = _run(capsys, *args, "--resume")
    assert code == 2
    assert "is not the tasks file this batch started with" in stderr
    assert "'r.jsonl/1'" in stderr
    assert not out.exists()


def test_an_unreachable_metrics_url_exits_1_and_writes_no_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    out = tmp_path / "r.jsonl"
    code, _, stderr = _run(
        capsys, GRAPH, str(tasks), "--url", f"http://127.0.0.1:{port}", "--out", str(out)
    )
    assert code == 1
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in stderr
    assert not out.exists()


def test_metrics_port_serves_the_batch_metrics_and_names_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n{"n": 2}\n', encoding="utf-8")
    out = tmp_path / "r.jsonl"
    code, _, err = _run(
        capsys,
        GRAPH,
        str(tasks),
        "--law",
        "static:1",
        "--out",
        str(out),
        "--no-progress",
        "--metrics-port",
        "0",
    )
    assert code == 0
    assert "batch metrics: http://127.0.0.1:" in err and "/metrics" in err
    assert len(_records(out)) == 2


def test_a_bad_metrics_port_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n', encoding="utf-8")
    out = tmp_path / "r.jsonl"
    code, _, err = _run(
        capsys, GRAPH, str(tasks), "--law", "static:1", "--out", str(out), "--metrics-port", "-3"
    )
    assert code == 2
    assert "metrics_port" in err
    assert not out.exists()


def test_a_batch_another_run_is_working_on_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import fcntl
    import os

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n{"n": 2}\n', encoding="utf-8")
    out = tmp_path / "r.jsonl"
    args = [GRAPH, str(tasks), "--law", "static:1", "--out", str(out), "--no-progress"]
    # What a running `concur run` of this batch holds: a flock on its checkpoint file.
    fd = os.open(f"{out}.checkpoints.sqlite", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _run(capsys, *args)
        assert code == 2
        assert "another concur run is working on this batch" in err
        assert not out.exists()
    finally:
        os.close(fd)  # the holder ends: the batch is free again
    code, _, _ = _run(capsys, *args, "--resume")
    assert code == 0
    assert sorted(_records(out)) == [1, 2]


def test_plot_and_the_windows_reasons_are_written_at_the_end(tmp_path: Path, sim_url: str) -> None:
    # A process of its own, as users run it (the graph makes a client per call, which a
    # process's exit closes).
    step_graph = f"{Path(__file__).resolve().parent / 'step_graph.py'}:graph"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(f'{{"topic": "t{i}", "rounds": 2, "tool_s": 1.0}}\n' for i in range(4))
    )
    out, png = tmp_path / "r.jsonl", tmp_path / "run.png"
    done = subprocess.run(
        [sys.executable, "-m", "concur_langgraph.cli", "run", step_graph, str(tasks),
         "--url", sim_url, "--law", "concur", "--out", str(out), "--no-progress",
         "--plot", str(png)],
        env={**os.environ, "CONCUR_TEST_LLM_URL": sim_url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("window: ") for line in lines), done.stdout
    assert any(line.startswith("last decision: window ") for line in lines), done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--law", "static:2", "--plot", "run.png"], "--plot: draws the window and the server"),
        (["--law", "static:2", "--url", "http://127.0.0.1:9", "--plot", "run.svg"], "a .png"),
    ],
)
def test_bad_plot_options_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    code, _, stderr = _run(capsys, GRAPH, str(tasks), "--out", str(tmp_path / "r.jsonl"), *extra)
    assert code == 2
    assert message in stderr

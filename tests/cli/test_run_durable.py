"""``concur run`` as users run it: a real process, a simulated vLLM over HTTP, killed mid-batch.

The graph (``step_graph.py``) logs every node execution with its thread, step and pid. Some
tasks hold in a tool step until the test creates a release file, so the batch is stopped while
those agents are mid-run, whatever the machine's speed; the others finish first. Then:

* SIGKILL, ``--resume``: every task has exactly one result line; agents that finished in run 1
  run no step in run 2, even the one whose result line the kill "lost" (its output comes from
  its checkpoint); held agents resume at the step they were killed in (the only step that
  runs twice: its work had not been checkpointed), not from the start;
* SIGINT: exit 130 with the command to resume, every line whole; the held agents finish their
  step and stop at the step boundary, so after ``--resume`` no step of any agent ran twice.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
GRAPH = f"{HERE / 'step_graph.py'}:graph"
CLI = [sys.executable, "-m", "concur_langgraph.cli"]
ROUNDS = 3  # think at steps 0, 2, 4, 6; tool at 1, 3, 5
LAST_STEP = 2 * ROUNDS
HOLD_AT = (1, 3, 5, 1, 3, 5)
FAST = 6


def _tasks(path: Path) -> dict[int, dict[str, Any]]:
    """FAST quick tasks, then a blank line, then the held ones; line -> task."""
    tasks: dict[int, dict[str, Any]] = {}
    lines: list[str] = []
    for i in range(FAST):
        tasks[len(lines) + 1] = {"topic": f"fast {i}", "rounds": ROUNDS, "tool_s": 0.01}
        lines.append(json.dumps(tasks[len(lines) + 1]))
    lines.append("")  # blank lines are not tasks, but count for line numbers
    for i, hold in enumerate(HOLD_AT):
        tasks[len(lines) + 1] = {"topic": f"held {i}", "rounds": ROUNDS, "hold_at": hold}
        lines.append(json.dumps(tasks[len(lines) + 1]))
    path.write_text("\n".join(lines) + "\n")
    return tasks


def _env(tmp_path: Path, sim_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CONCUR_TEST_LLM_URL": sim_url,
        "CONCUR_TEST_STEP_LOG": str(tmp_path / "steps.log"),
        "CONCUR_TEST_RELEASE": str(tmp_path / "release"),
    }


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def _steps(tmp_path: Path) -> list[dict[str, Any]]:
    return _complete_lines(tmp_path / "steps.log")


def _wait_until(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 90
) -> None:
    """Poll for a state of the files the batch writes; fail if the process dies first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"concur run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mid_batch(tmp_path: Path, out: Path, held: dict[int, int]) -> Callable[[], bool]:
    """Every fast task has its result and every held agent sits in its held tool step."""

    def ready() -> bool:
        if len(_complete_lines(out)) < FAST:
            return False
        holding = {
            e["thread"] for e in _steps(tmp_path) if e["node"] == "tool" and held_at(e) is True
        }
        return len(holding) == len(held)

    def held_at(entry: dict[str, Any]) -> bool:
        line = int(entry["thread"].rsplit("/", 1)[1])
        return held.get(line) == entry["step"]

    return ready


def _by_thread(entries: list[dict[str, Any]], pid: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        if e["pid"] == pid:
            out[e["thread"]].append(e["step"])
    return out


def _start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    # The child keeps its own copies of the descriptors; ours close on leaving the block.
    with open(cwd / "stdout.txt", "wb") as stdout, open(cwd / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr)


def _check_results(out: Path, tasks: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    data = out.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.splitlines()]
    assert sorted(r["line"] for r in records) == sorted(tasks)  # exactly one per task
    for r in records:
        assert r["status"] == "ok", r
        assert r["thread_id"] == f"r.jsonl/{r['line']}"
        assert r["output"]["topic"] == tasks[r["line"]]["topic"]
        assert r["output"]["step"] == LAST_STEP + 1
        assert len(r["output"]["notes"]) == ROUNDS + 1
    return records


def test_sigkill_mid_batch_then_resume_runs_each_step_once(tmp_path: Path, sim_url: str) -> None:
    tasks = _tasks(tmp_path / "tasks.jsonl")
    held = {line: t["hold_at"] for line, t in tasks.items() if "hold_at" in t}
    env = _env(tmp_path, sim_url)
    argv = [*CLI, "run", GRAPH, "tasks.jsonl", "--url", sim_url, "--out", "r.jsonl"]
    out = tmp_path / "r.jsonl"

    first = _start(argv, env, tmp_path)
    _wait_until("the fast agents' results", _mid_batch(tmp_path, out, held), first)
    first.kill()
    assert first.wait(timeout=30) == -signal.SIGKILL
    finished_in_run_1 = {r["line"] for r in _complete_lines(out)}
    assert finished_in_run_1 == set(tasks) - set(held)
    # A kill after an agent's last checkpoint but before its result line: drop line 2's
    # record. Then what a kill inside a write leaves: a cut last line.
    kept = [x for x in out.read_bytes().splitlines(keepends=True) if json.loads(x)["line"] != 2]
    out.write_bytes(b"".join(kept) + b'{"line":2,"thread_id":"r.jsonl/2","sta')

    (tmp_path / "release").touch()
    second = subprocess.run(
        [*argv, "--resume", "--no-progress"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "removed a cut last line" in second.stderr
    # Line 2 came back from its checkpoint: a result now, no step run (checked below).
    assert "this run: 7 done, 0 failed" in second.stdout
    _check_results(out, tasks)

    entries = _steps(tmp_path)
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    assert len(pids) == 2
    run1, run2 = _by_thread(entries, pids[0]), _by_thread(entries, pids[1])
    for line in tasks:
        thread = f"r.jsonl/{line}"
        if line in finished_in_run_1:
            assert run1[thread] == list(range(LAST_STEP + 1))
            assert thread not in run2  # a finished agent never runs again
        else:
            hold = held[line]
            # Run 1 got to the held tool step; its checkpoint is the step before it. Run 2
            # re-runs only that unfinished step and continues, never from step 0.
            assert run1[thread] == list(range(hold + 1))
            assert run2[thread] == list(range(hold, LAST_STEP + 1))


def test_sigint_drains_prints_the_resume_command_and_resume_finishes(
    tmp_path: Path, sim_url: str
) -> None:
    tasks = _tasks(tmp_path / "tasks.jsonl")
    held = {line: t["hold_at"] for line, t in tasks.items() if "hold_at" in t}
    env = _env(tmp_path, sim_url)
    argv = [*CLI, "run", GRAPH, "tasks.jsonl", "--url", sim_url, "--out", "r.jsonl"]
    out = tmp_path / "r.jsonl"

    first = _start(argv, env, tmp_path)
    _wait_until("the fast agents' results", _mid_batch(tmp_path, out, held), first)
    first.send_signal(signal.SIGINT)
    stderr = tmp_path / "stderr.txt"
    _wait_until("the drain message", lambda: b"stopping: draining" in stderr.read_bytes(), first)
    # Only now let the held tool steps finish: each agent then stops at the step boundary.
    (tmp_path / "release").touch()
    assert first.wait(timeout=60) == 130, stderr.read_text()[-3000:]
    assert f"stopping: draining {len(held)} running agents (Ctrl-C again to stop now)" in (
        stderr.read_text()
    )
    stdout = (tmp_path / "stdout.txt").read_text()
    assert f"stopped by SIGINT: {len(held)} agents unfinished" in stdout
    resume = stdout.split("resume with:\n", 1)[1].strip()
    data = out.read_bytes()
    assert data.endswith(b"\n")  # no half-written line
    assert {json.loads(x)["line"] for x in data.splitlines()} == set(tasks) - set(held)

    command = shlex.split(resume)
    assert command[:2] == ["concur", "run"] and command[-1] == "--resume"
    second = subprocess.run(
        [*CLI, *command[1:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"this run: {len(held)} done, 0 failed" in second.stdout
    _check_results(out, tasks)

    entries = _steps(tmp_path)
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    run1, run2 = _by_thread(entries, pids[0]), _by_thread(entries, pids[1])
    for line, hold in held.items():
        thread = f"r.jsonl/{line}"
        # Drained at the boundary after the held step: no step of any agent ran twice.
        assert run1[thread] == list(range(hold + 1))
        assert run2[thread] == list(range(hold + 1, LAST_STEP + 1))


def test_a_second_sigterm_stops_at_once_and_resume_redoes_only_the_cut_steps(
    tmp_path: Path, sim_url: str
) -> None:
    tasks = _tasks(tmp_path / "tasks.jsonl")
    held = {line: t["hold_at"] for line, t in tasks.items() if "hold_at" in t}
    env = _env(tmp_path, sim_url)
    argv = [*CLI, "run", GRAPH, "tasks.jsonl", "--url", sim_url, "--out", "r.jsonl"]
    out = tmp_path / "r.jsonl"

    first = _start(argv, env, tmp_path)
    _wait_until("the fast agents' results", _mid_batch(tmp_path, out, held), first)
    stderr = tmp_path / "stderr.txt"
    first.send_signal(signal.SIGTERM)
    _wait_until("the drain message", lambda: b"stopping: draining" in stderr.read_bytes(), first)
    # The held agents never finish their step, so the drain cannot end: stop now.
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143, stderr.read_text()[-3000:]
    assert "(SIGTERM again to stop now)" in stderr.read_text()
    assert "stopping now" in stderr.read_text()
    assert "resume with:" in (tmp_path / "stdout.txt").read_text()
    assert out.read_bytes().endswith(b"\n")

    (tmp_path / "release").touch()
    second = subprocess.run(
        [*argv, "--resume", "--no-progress"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    _check_results(out, tasks)
    entries = _steps(tmp_path)
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    run1, run2 = _by_thread(entries, pids[0]), _by_thread(entries, pids[1])
    for line, hold in held.items():
        thread = f"r.jsonl/{line}"
        # Cancelled inside the held step: only that step runs again.
        assert run1[thread] == list(range(hold + 1))
        assert run2[thread] == list(range(hold, LAST_STEP + 1))

"""``concur run`` stopped at every checkpoint write, then ``--resume``: no truncated result.

For every N from the first to the last checkpoint write of a batch, a forked copy of this
process runs ``concur run`` with its SQLite saver wrapped in a :class:`StoppingSaver` that,
right after write N:

* sends the process SIGKILL (a crash: nothing more happens), or
* sends it SIGINT twice (a double Ctrl-C: drain, then stop at once; exit status 130).

Then ``concur run ... --resume`` finishes the batch. What must hold for every N:

* a result line written before the stop is a finished agent, and its checkpoint says so;
* after the resume every task has exactly one result line, and every one is a finished agent;
* the resume ran exactly the steps the checkpoints did not hold: an agent whose checkpoints
  held k finished steps runs steps k, k + 1, ... to the end, and an agent with a result line
  runs nothing.

The graph (``crash_graph.py``) needs no server: a scripted chat model, gated by ``--law
static:2``, and a log line per node execution with the pid that ran it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from _crash_support import StoppingSaver, run_in_child

from concur_langgraph import cli
from concur_langgraph.cli import run as run_cli

HERE = Path(__file__).resolve().parent
GRAPH = f"{HERE / 'crash_graph.py'}:graph"
TASKS = 3
ROUNDS = 2  # think at steps 0, 2, 4; tool at 1, 3
LAST_STEP = 2 * ROUNDS


def _argv(tmp: Path, *extra: str) -> list[str]:
    tasks = tmp / "tasks.jsonl"
    if not tasks.exists():
        lines = [json.dumps({"topic": f"t{i}", "rounds": ROUNDS}) for i in range(TASKS)]
        tasks.write_text("\n".join(lines) + "\n")
    return [
        "run", GRAPH, str(tasks), "--law", "static:2", "--out", str(tmp / "r.jsonl"),
        "--no-progress", *extra,
    ]  # fmt: skip


def _with_saver_hooks(hooks: dict[int, Callable[[], None]], counted: list[int]) -> None:
    """Make ``concur run`` open its SQLite saver through a :class:`StoppingSaver`."""
    real = run_cli._open_saver

    @asynccontextmanager
    async def open_saver(path: str) -> AsyncIterator[Any]:
        async with real(path) as saver:
            stopping = StoppingSaver(saver, hooks=hooks)
            try:
                yield stopping
            finally:
                counted.append(stopping.writes)

    run_cli._open_saver = open_saver  # type: ignore[assignment]


def _run(argv: list[str], *, hooks: dict[int, Callable[[], None]]) -> tuple[int, int, str]:
    """``concur run`` in this process: (exit status, writes, stdout)."""
    counted: list[int] = []
    real = run_cli._open_saver
    _with_saver_hooks(hooks, counted)
    out = StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(StringIO()):
            code = cli.main(argv)
    finally:
        run_cli._open_saver = real  # type: ignore[assignment]
    return code, sum(counted), out.getvalue()


def _stopping_child(argv: list[str], after: int, stop: str, env: dict[str, str]) -> None:
    """``concur run`` in a child process that stops itself right after write ``after``."""
    os.environ.update(env)

    def sigkill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def ctrl_c_twice() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    code, _, _ = _run(argv, hooks={after: sigkill if stop == "sigkill" else ctrl_c_twice})
    sys.exit(code)


def _records(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "r.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def _finished(record: dict[str, Any]) -> bool:
    out = record.get("output") or {}
    return (
        record["status"] == "ok"
        and out.get("step") == LAST_STEP + 1
        and len(out.get("notes", [])) == ROUNDS + 1
    )


def _stored(tmp: Path) -> dict[int, Any]:
    """Line -> the latest state snapshot of its thread in the checkpoint file."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async def read() -> dict[int, Any]:
        graph = await run_cli.resolve_graph(GRAPH)
        async with AsyncSqliteSaver.from_conn_string(str(tmp / "r.jsonl.checkpoints.sqlite")) as s:
            stored = graph.copy(update={"checkpointer": s})
            return {
                line: await stored.aget_state({"configurable": {"thread_id": f"r.jsonl/{line}"}})
                for line in range(1, TASKS + 1)
            }

    return asyncio.run(read())


def _steps_run(log: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            out.setdefault(entry["thread"], []).append(entry["step"])
    return out


def _stop_then_resume(tmp: Path, after: int, stop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("r.jsonl", "r.jsonl.checkpoints.sqlite", "steps.log"):
        (tmp / name).unlink(missing_ok=True)
    monkeypatch.setenv("CONCUR_TEST_STEP_LOG", str(tmp / "steps.log"))

    env = {"CONCUR_TEST_STEP_LOG": str(tmp / "steps.log")}
    code = run_in_child(_stopping_child, _argv(tmp), after, stop, env)
    if stop == "sigkill":
        assert code == -signal.SIGKILL, (after, code)
    else:
        # 130: stopped. 0: the signals came with the batch's very last writes, and the loop
        # ended before it read them: the batch finished, every task has its result.
        assert code == 130 or (code == 0 and len(_records(tmp)) == TASKS), (after, code)
    given = _records(tmp)
    stored = _stored(tmp)
    for record in given:
        assert _finished(record), f"write {after}: an unfinished agent's result: {record}"
        assert stored[record["line"]].tasks == (), f"write {after}: {record['line']}"

    monkeypatch.setenv("CONCUR_TEST_STEP_LOG", str(tmp / "resume.log"))
    (tmp / "resume.log").unlink(missing_ok=True)
    code, _, stdout = _run(_argv(tmp, "--resume"), hooks={})
    assert code == 0, stdout
    records = _records(tmp)
    assert sorted(r["line"] for r in records) == list(range(1, TASKS + 1)), records
    assert all(_finished(r) for r in records), records
    resumed = _steps_run(tmp / "resume.log")
    had_result = {r["line"] for r in given}
    for line in range(1, TASKS + 1):
        thread = f"r.jsonl/{line}"
        if line in had_result:
            assert thread not in resumed
            continue
        held = stored[line].values.get("step", 0) if stored[line].metadata else 0
        assert resumed.get(thread, []) == list(range(held, LAST_STEP + 1)), (
            f"write {after}, {thread}: checkpoints held {held} steps, resume ran "
            f"{resumed.get(thread)}"
        )


@pytest.mark.parametrize("stop", ["sigkill", "double-ctrl-c"])
def test_concur_run_stopped_at_every_write_resumes_to_finished_results_only(
    stop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCUR_TEST_STEP_LOG", str(tmp_path / "full.log"))
    code, total, _ = _run(_argv(tmp_path), hooks={})
    assert code == 0 and total > TASKS
    for after in range(total):
        _stop_then_resume(tmp_path, after, stop, monkeypatch)

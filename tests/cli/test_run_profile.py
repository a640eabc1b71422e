"""``concur run --profile``: a batch saves what it measured; the next batch starts from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from concur_langgraph import BatchProfile, cli

HERE = Path(__file__).resolve().parent
GRAPH = f"{HERE / 'plain_graph.py'}:graph"
CLI = [sys.executable, "-m", "concur_langgraph.cli"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


STEP_GRAPH = f"{HERE / 'step_graph.py'}:graph"


def test_profile_saves_what_the_batch_measured_and_starts_the_next_from_it(
    tmp_path: Path, sim_url: str
) -> None:
    # Each batch in its own process, as users run it: the LLM graph's openai client is cached
    # per process and bound to the first run's event loop.
    env = {**os.environ, "CONCUR_TEST_LLM_URL": sim_url}
    env.pop("CONCUR_TEST_STEP_LOG", None)
    tasks = tmp_path / "tasks.jsonl"
    # Long enough (3 rounds of 1 s tools) for the controller's 1 s ticks to see calls finish.
    lines = [json.dumps({"topic": f"t{i}", "rounds": 3, "tool_s": 1.0}) for i in range(8)]
    tasks.write_text("\n".join(lines) + "\n")
    profile = tmp_path / "agent.profile.json"
    argv = [*CLI, "run", STEP_GRAPH, str(tasks), "--url", sim_url, "--profile", str(profile)]

    def run(out: str) -> str:
        done = subprocess.run(
            [*argv, "--out", str(tmp_path / out), "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    err = run("first.jsonl")
    assert f"warm start: no profile at {profile} yet" in err
    saved = BatchProfile.load(profile)
    assert saved is not None and f"profile saved: {profile}" in err
    assert saved.agents == 8 and saved.kv_capacity_tokens == 1024  # test-tiny's cache

    # The next batch of the same agent reads it; eight small agents fit the cache: open start.
    err = run("second.jsonl")
    assert f"warm start from {profile}: the batch starts open (it fits)" in err
    assert f"profile saved: {profile}" in err


@pytest.mark.parametrize(
    ("extra", "content", "message"),
    [
        (
            ["--law", "concur"],
            None,
            r"--profile: a warm start is AdmitLaw's \(--law admit, which --profile implies\)",
        ),
        (["--redis", "redis://x", "--batch-id", "b"], None, r"--profile: not with --redis"),
        ([], "{not json", r"error: .*p\.json: not JSON"),
        ([], '{"format": "other"}', r"error: .*p\.json: format: expected"),
    ],
)
def test_a_profile_that_cannot_work_is_refused_before_anything_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    content: str | None,
    message: str,
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"n": 1}\n')
    profile, out = tmp_path / "p.json", tmp_path / "r.jsonl"
    if content is not None:
        profile.write_text(content)
    argv = [GRAPH, str(tasks), "--url", "http://127.0.0.1:9", "--out", str(out)]
    code, _, err = _run(capsys, *argv, "--profile", str(profile), *extra)
    assert code == 2
    assert re.search(message, err), err
    assert not out.exists()

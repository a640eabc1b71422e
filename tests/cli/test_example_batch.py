"""The example of docs/batch-cli.md runs as documented, against the simulator over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from langchain_core.messages import AnyMessage
from pydantic import TypeAdapter

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch"


def test_the_documented_example_batch_runs_and_its_messages_read_back(
    tmp_path: Path, sim_url: str
) -> None:
    tasks = EXAMPLE / "tasks.jsonl"
    out = tmp_path / "results.jsonl"
    # A subprocess, as users run it: the model's HTTP client lives and dies with the process.
    done = subprocess.run(
        [sys.executable, "-m", "concur_langgraph.cli", "run",
         f"{EXAMPLE / 'research_agent.py'}:make_graph", str(tasks), "--url", sim_url,
         "--out", str(out)],
        env={**os.environ, "VLLM_URL": sim_url, "VLLM_MODEL": "test-tiny"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in tasks.read_text().splitlines()]
    assert f"batch: {len(lines)} of {len(lines)} tasks have a result" in done.stdout
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["line"] for r in records) == list(range(1, len(lines) + 1))
    for record in records:
        task = lines[record["line"] - 1]
        messages = TypeAdapter(list[AnyMessage]).validate_python(record["output"]["messages"])
        # The question, then one answer per round with an observation between two answers.
        assert [m.type for m in messages] == [
            "human",
            *["ai", "human"] * (task["rounds"] - 1),
            "ai",
        ]
        assert messages[0].content == task["messages"][0]["content"]

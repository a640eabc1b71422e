"""Fixtures of the benchmark tests: a tiny workload that runs in well under a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from concur_langgraph.bench._workload import Workload

# Sized for the simulator's test-tiny preset (max_model_len 512, a 1024-token KV cache): six
# agents whose contexts reach ~250 tokens, so the cache is contended but every request fits.
TINY: dict[str, Any] = {
    "name": "tiny",
    "agents": 6,
    "seed": 3,
    "system_prompt_tokens": 16,
    "task_prompt_tokens": {"uniform": [8, 20]},
    "steps": {"uniform": [2, 4]},
    "output_tokens": {"uniform": [5, 15]},
    "observation_tokens": {"uniform": [10, 30]},
    "tool_latency_s": {"uniform": [0.5, 1.5]},
}


@pytest.fixture
def tiny_dict() -> dict[str, Any]:
    return json.loads(json.dumps(TINY))


@pytest.fixture
def tiny_workload() -> Workload:
    return Workload.from_dict(TINY, source="tiny")


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY), encoding="utf-8")
    return path

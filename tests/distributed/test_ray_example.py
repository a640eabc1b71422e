"""examples/ray_workers.py as a user runs it: Ray actors sharing one window on Redis.

In the Redis tier (the ``redis`` marker, from this folder's conftest); skipped where ray is not
installed (``pip install 'concur-langgraph[ray]'``; ``make test`` installs it with ``all``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from concur_langgraph.testing.sim_process import served_simulator

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (the ray extra)"
)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_a_batch_split_over_ray_actors_shares_one_window(
    redis_url: str, batch_id: str, dynamic: bool
) -> None:
    window = 5
    with served_simulator("--preset", "test-tiny") as sim:
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "ray_workers.py"),
             "--actors", "3", "--agents", "6", "--window", str(window),
             "--redis-url", redis_url, "--vllm-url", sim.url, "--batch-id", batch_id,
             *(["--dynamic"] if dynamic else ["--measure", "200"])],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "18 of 18 agents finished, 0 failed" in out.stdout
    for i in range(3):
        assert f"[actor-{i}] 6 agents done" in out.stdout
    if dynamic:
        # An actor led the shared window (one at a time; a leader that finishes its share
        # hands over, so a later one may lead too: tests/distributed/test_leader.py).
        assert out.stdout.count("led the window") >= 1
        return
    # Three actors, one window of 5: the server never held more than 5 of the 18 agents'
    # calls (a per-actor semaphore of 5 would let it hold 15).
    peak = int(re.search(r"held at once: (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert 1 <= peak <= window
    # The round trips were measured from inside an actor (docs/distributed.md, "Ray").
    assert "acquire+release on RedisWindow, inside a Ray actor: p50" in out.stdout
    assert "one empty async actor call" in out.stdout

"""4 worker processes x 32 agents, one simulated vLLM, one window on Redis.

Each worker runs ``ConcurGate(graph, window=RedisWindow(...))`` over real HTTP against one
``concur sim serve`` process (real time, ``test-tiny`` preset). Throughout the batch the test
samples the invariant from both sides:

* Redis: holders never exceed the window;
* the simulator: requests in flight (running + waiting, one per agent at most, since each agent
  makes one call at a time) never exceed the window - the server never sees more agents than
  the shared window admits, however many processes there are.

All 128 results must come back, each one the right agent's full conversation.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis_asyncio
from redis_support import REPO, Worker

from concur_langgraph.distributed.redis_window import batch_key

GATE_WORKER = Path(__file__).with_name("_gate_worker.py")
WINDOW = 8
WORKERS = 4
AGENTS = 32
# One tool step (two LLM calls per agent) keeps 4 processes x 32 agents to seconds on a small
# CI box: the cost is the client stack's CPU per call, not the simulated server.
STEPS = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def sim_url() -> Iterator[str]:
    """``concur sim serve`` on a free loopback port; stopped by PID."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "concur_langgraph.cli", "sim", "serve", "--preset", "test-tiny",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded: start-up is imports, seconds on a busy box
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"concur sim serve exited with {proc.returncode}: {err}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            subprocess.run(["sleep", "0.05"], check=False)
        else:
            pytest.fail("concur sim serve did not answer /health")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _in_flight(metrics: str) -> int:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def test_four_workers_share_one_window_against_one_simulator(
    redis_url: str, batch_id: str, sim_url: str
) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    workers: list[Worker] = []
    stop = asyncio.Event()
    seen = {"requests": 0, "holders": 0, "samples": 0, "busy_samples": 0}

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=sim_url, timeout=5.0) as http:
            while not stop.is_set():
                response = await http.get("/metrics")
                requests = _in_flight(response.text)
                holders = int(await client.zcard(batch_key(batch_id, "holders")))
                seen["requests"] = max(seen["requests"], requests)
                seen["holders"] = max(seen["holders"], holders)
                seen["samples"] += 1
                seen["busy_samples"] += requests > 0
                await asyncio.sleep(0.02)  # sampling must not starve the simulator

    watcher = asyncio.create_task(watch())
    try:
        args = ["--url", redis_url, "--batch", batch_id, "--sim", sim_url, "--agents",
                str(AGENTS), "--window", str(WINDOW), "--steps", str(STEPS), "--tool-s", "0.01",
                "--max-tokens", "4"]  # fmt: skip
        for i in range(WORKERS):
            workers.append(await Worker(f"w{i}", args, script=GATE_WORKER).start())
        for w in workers:
            assert await w.wait(timeout_s=90) == 0, w.stderr.decode()[-3000:]
    finally:
        stop.set()
        await watcher
        for w in workers:
            await w.kill()
        await client.aclose()

    results = [w.last("results") for w in workers]
    assert all(r is not None for r in results), [w.stderr.decode()[-2000:] for w in workers]
    assert sum(r["n"] for r in results if r) == WORKERS * AGENTS
    assert sum(r["complete"] for r in results if r) == WORKERS * AGENTS
    assert seen["busy_samples"] > 0, "the watcher never saw the batch running"
    assert seen["requests"] <= WINDOW, seen
    assert seen["holders"] <= WINDOW, seen

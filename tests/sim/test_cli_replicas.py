"""``concur sim serve --replicas N``: N independent servers on consecutive ports, one process."""

from __future__ import annotations

import time

import httpx
import pytest

from concur_langgraph.cli import main
from concur_langgraph.testing.sim_process import served_simulator


def _generated(client: httpx.Client, url: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError("vllm:generation_tokens_total")


def test_replicas_serve_on_consecutive_ports_with_their_own_engines() -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 4,
        "ignore_eos": True,
    }
    with served_simulator("--preset", "test-tiny", "--replicas", "2") as sim:
        host, port = sim.url.rsplit(":", 1)
        second = f"{host}:{int(port) + 1}"
        with httpx.Client(timeout=30.0) as client:
            for _ in range(200):  # the two start together; the first answered already
                try:
                    if client.get(f"{second}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)  # polling a child process's start-up
            model = client.get(f"{sim.url}/v1/models").json()["data"][0]["id"]
            answer = client.post(f"{second}/v1/chat/completions", json={**body, "model": model})
            assert answer.status_code == 200
            assert _generated(client, second) == 4.0
            assert _generated(client, sim.url) == 0.0
        proc = sim.proc
    # SIGTERM (the helper's stop) stops both replicas and the process exits cleanly.
    assert proc.returncode == 0


def test_replicas_must_fit_the_port_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "serve", "--preset", "test-tiny", "--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err
    argv = ["sim", "serve", "--preset", "test-tiny", "--port", "65535", "--replicas", "2"]
    assert main(argv) == 2

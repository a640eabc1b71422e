"""``concur sim serve --fault ...``: the faults over a real socket (uvicorn, real time)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from concur_langgraph import MetricsError, MetricsUnavailableError, VLLMMetricsSource
from concur_langgraph.cli import main
from concur_langgraph.testing.sim_process import served_simulator

CHAT = {"model": "test-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def served() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``concur sim serve`` with faults, in a subprocess on a free loopback port."""
    with served_simulator(
        *("--preset", "test-tiny"),
        *("--fault", "metrics=down", "--fault", "chat=error", "--fault", "chat_status=429"),
        *("--fault", "chat_retry_after_s=1.5", "--fault", "chat_next=1"),
        log_level="critical",
    ) as sim:
        yield sim.url, sim.proc


def test_served_faults_over_a_socket_and_changed_while_running(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    url, _proc = served
    with httpx.Client(base_url=url, timeout=10.0) as client:
        # metrics=down: the server drops the connection mid-answer.
        with pytest.raises(httpx.TransportError):
            client.get("/metrics")
        limited = client.post("/v1/chat/completions", json=CHAT)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1.5"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # chat_next=1

        async def scrape() -> Exception | None:
            source = VLLMMetricsSource(url, timeout_s=5.0)
            try:
                await source.start()
            except MetricsError as exc:
                return exc
            finally:
                await source.aclose()
            return None

        assert isinstance(asyncio.run(scrape()), MetricsUnavailableError)

        html = client.post("/_sim/faults", json={"metrics": "html"})
        assert html.json()["faults"]["metrics"] == "html"
        assert client.get("/metrics").headers["content-type"].startswith("text/html")
        assert client.post("/_sim/faults", json={}).status_code == 200
        healthy = client.get("/metrics")
        assert healthy.status_code == 200 and "vllm:kv_cache_usage_perc" in healthy.text
        assert asyncio.run(scrape()) is None


def test_serve_refuses_a_bad_fault_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "serve", "--preset", "test-tiny", "--fault", "chat_status=42"]) == 2
    assert "--fault chat_status: must be an HTTP error status" in capsys.readouterr().err
    assert main(["sim", "serve", "--preset", "test-tiny", "--fault", "colour=red"]) == 2
    assert "unknown field 'colour'" in capsys.readouterr().err

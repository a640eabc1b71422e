"""The Prometheus export of a session: scraped over HTTP while agents run on the simulator.

The batch runs in virtual time (the whole client stack on the simulator's ASGI app); the
exporter is a real TCP server on loopback in the same event loop, scraped with a real HTTP
client and parsed with prometheus_client's own parser, as Prometheus would.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import ConcurGate, ConcurLaw, ConcurSession, FixedLaw, Sample, SessionOptions
from concur_langgraph.core.window import OPEN
from concur_langgraph.errors import (
    ConcurError,
    ConfigError,
    MetricsUnavailableError,
    NotVLLMError,
)
from concur_langgraph.session.exporter import METRICS, MetricsExporter
from concur_langgraph.sim import SimServer
from concur_langgraph.testing.agent_loop import loop_tasks, observation_loop
from concur_langgraph.testing.vtime_fixtures import virtual_time

AGENTS = 8
STEPS = 3

Scrape = dict[tuple[str, str], float]


def parse(text: str) -> Scrape:
    """Every sample of an exposition as ``(name, state label) -> value``; checks HELP/TYPE."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        declared = family.name if family.name in METRICS else family.name.removesuffix("_total")
        assert declared in METRICS, family.name
        assert family.type == METRICS[declared][0], family.name
        for sample in family.samples:
            out[(sample.name, sample.labels.get("state", ""))] = sample.value
    return out


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@virtual_time
async def test_scrapes_follow_a_batch_on_the_simulator() -> None:
    scrapes: list[Scrape] = []
    async with SimServer("test-tiny") as server, server.http_client() as client:
        gate = ConcurGate(
            observation_loop(server.chat_model(max_tokens=8), steps=STEPS, tool_s=2.0),
            vllm_url=server.root_url,
            http_client=client,
            law=ConcurLaw(),
            initial_window=2,
            interval_s=0.5,
            metrics_port=0,
        )
        async with gate:
            session = gate.session
            assert session is not None and session.metrics_url is not None
            url = session.metrics_url
            batch = asyncio.create_task(gate.abatch(loop_tasks(AGENTS)))
            while not batch.done():
                scrapes.append(await scrape(url))
                await asyncio.wait([batch], timeout=1.0)
            results = batch.result()
            final = await scrape(url)
            after = session.statistics()
        with pytest.raises(httpx.ConnectError):  # stopped with the session
            await scrape(url)

    assert len(results) == AGENTS and len(scrapes) >= 3
    # While the batch ran: agents were seen queueing behind the small window, then running.
    assert any(s[("concur_agents", "waiting")] > 0 for s in scrapes)
    assert any(s[("concur_agents", "active")] > 0 for s in scrapes)
    for s in scrapes:
        in_gate = sum(s[("concur_agents", state)] for state in ("active", "parked", "waiting"))
        assert in_gate + s[("concur_agents_completed_total", "")] <= AGENTS
        # One process: every slot of the window is held by an agent of this gate.
        assert s[("concur_window_holders", "")] == s[("concur_agents", "active")]
    for name in ("concur_agents_completed_total", "concur_llm_calls_total", "concur_parks_total",
                 "concur_controller_ticks_total", "concur_admissions_total"):  # fmt: skip
        values = [s.get((name, ""), 0.0) for s in [*scrapes, final]]
        assert values == sorted(values), name  # counters never go down
    # At the end: the numbers are the session's own.
    assert after.controller is not None and after.controller.last_sample is not None
    assert final[("concur_agents_completed_total", "")] == AGENTS == after.gate.completed
    assert final[("concur_llm_calls_total", "")] == AGENTS * (STEPS + 1) == after.gate.llm_calls
    assert final[("concur_parks_total", "")] == after.gate.parks_total
    assert final[("concur_window", "")] == after.gate.window.limit
    assert final[("concur_window_open", "")] == 0.0
    assert [final[("concur_agents", st)] for st in ("active", "parked", "waiting")] == [0, 0, 0]
    assert 1 <= final[("concur_controller_ticks_total", "")] <= after.controller.ticks
    assert final[("concur_controller_errors_total", "")] == 0
    assert final[("concur_metrics_stale", "")] == 0
    assert final[("concur_sample_kv_capacity_tokens", "")] == 64 * 16  # test-tiny's cache
    assert 0.0 <= final[("concur_sample_kv_usage_ratio", "")] <= 1.0
    assert final[("concur_sample_interval_seconds", "")] == pytest.approx(0.5)
    # The accounting: every answer's 8 tokens generated, the contexts of agents in the window
    # (between their calls) seen while it ran, nothing left at the end.
    assert final[("concur_generated_tokens_total", "")] == AGENTS * (STEPS + 1) * 8
    assert final[("concur_calls_without_usage_total", "")] == 0
    assert any(s[("concur_agent_context_tokens", "active")] > 0 for s in scrapes)
    assert final[("concur_agent_context_tokens", "active")] == 0


async def test_without_signals_only_the_gate_is_exported() -> None:
    async with ConcurSession(law=FixedLaw(2), metrics_port=0) as session:
        assert session.metrics_url is not None
        for agent in ("a", "b", "c"):
            if agent != "c":
                await session.gate.before_llm_call(agent)
        waiter = asyncio.create_task(session.gate.before_llm_call("c"))
        await asyncio.sleep(0)  # let it queue
        got = await scrape(session.metrics_url)
        await session.gate.release("a")
        await waiter
        await session.gate.release("b")
        await session.gate.release("c")
        done = await scrape(session.metrics_url)
    assert got[("concur_window", "")] == 2 and got[("concur_window_open", "")] == 0
    assert [got[("concur_agents", s)] for s in ("active", "parked", "waiting")] == [2, 0, 1]
    assert got[("concur_llm_calls_total", "")] == 3  # counted on arrival, the waiter's too
    assert not any(name.startswith(("concur_controller", "concur_sample")) for name, _ in got)
    assert ("concur_leader", "") not in got  # nothing to lead in one process
    assert done[("concur_agents_completed_total", "")] == 3
    assert done[("concur_admissions_total", "")] == 3


async def test_an_open_window_is_flagged() -> None:
    async with ConcurSession(law=FixedLaw(OPEN), metrics_port=0) as session:
        assert session.metrics_url is not None
        got = await scrape(session.metrics_url)
    assert got[("concur_window_open", "")] == 1 and got[("concur_window", "")] == OPEN


class FlakySource:
    """A signal source whose /metrics fails from the second sample on."""

    def __init__(self) -> None:
        self.calls = 0

    async def start(self) -> None:
        return None

    async def sample(self, now: float) -> Sample:
        self.calls += 1
        if self.calls > 1:
            raise MetricsUnavailableError("http://vllm.invalid/metrics: connection refused")
        return Sample(
            time=now, kv_usage=0.3, prefix_hit_rate=None, prefix_queries=0, prefix_hits=0,
            preemptions=2, prompt_tokens=0, generation_tokens=0, running=1, waiting=0,
            waiting_capacity=None, kv_capacity_tokens=None, interval_s=1.0,
        )  # fmt: skip

    async def aclose(self) -> None:
        return None


@virtual_time
async def test_a_metrics_outage_shows_as_stale() -> None:
    async with ConcurSession(source=FlakySource(), law=ConcurLaw(), metrics_port=0) as session:
        assert session.metrics_url is not None
        await asyncio.sleep(1.5)  # tick 1 (good) at 1 s
        good = await scrape(session.metrics_url)
        await asyncio.sleep(3.0)  # ticks 2..4 fail
        held = await scrape(session.metrics_url)
    assert good[("concur_metrics_stale", "")] == 0
    assert good[("concur_sample_preemptions", "")] == 2
    assert ("concur_sample_prefix_hit_ratio", "") not in good  # no queries: no made-up rate
    assert ("concur_sample_waiting_capacity", "") not in good
    assert held[("concur_metrics_stale", "")] == 1
    assert held[("concur_controller_errors_total", "")] == 3
    assert held[("concur_metrics_staleness_seconds", "")] == pytest.approx(3.5)
    assert held[("concur_sample_kv_usage_ratio", "")] == 0.3  # the last sample, kept
    assert held[("concur_window", "")] == good[("concur_window", "")]  # held


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_port_in_use_is_a_config_error_naming_metrics_port(busy_port: int) -> None:
    session = ConcurSession(law=FixedLaw(2), metrics_port=busy_port)
    with pytest.raises(ConfigError, match=rf"^metrics_port: port {busy_port} .* already in use"):
        await session.__aenter__()
    assert session.closed and session.metrics_url is None


async def test_sessions_on_port_zero_get_their_own_ports() -> None:
    async with (
        ConcurSession(law=FixedLaw(1), metrics_port=0) as one,
        ConcurSession(law=FixedLaw(3), metrics_port=0) as two,
    ):
        assert one.metrics_url is not None and two.metrics_url is not None
        assert one.metrics_url != two.metrics_url
        assert (await scrape(one.metrics_url))[("concur_window", "")] == 1
        assert (await scrape(two.metrics_url))[("concur_window", "")] == 3


@pytest.mark.parametrize("port", [-1, 65536, True, "9100", 1.5])
def test_metrics_port_is_validated(port: object) -> None:
    with pytest.raises(ConfigError, match=r"^metrics_port: must be None, 0"):
        SessionOptions(law=FixedLaw(2), metrics_port=port)  # type: ignore[arg-type]


def test_a_session_that_exports_must_be_entered() -> None:
    session = ConcurSession(law=FixedLaw(2), metrics_port=0)
    with pytest.raises(ConcurError, match=r"metrics_port.*must be entered"):
        session.check_usable("ConcurCallbackHandler")
    ConcurSession(law=FixedLaw(2)).check_usable("ConcurCallbackHandler")  # no export: usable


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    writer.write_eof()  # the client is done: a partial head must not wait for the timeout
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_http_edges() -> None:
    session = ConcurSession(law=FixedLaw(2))
    async with MetricsExporter(session.statistics, port=0) as exporter:
        port = exporter.port
        assert port is not None
        head = await raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert f"Content-Length: {len(exporter.render())}".encode() in head
        assert (await raw(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await raw(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        # Garbage and a client that hangs up mid-head get nothing, and the server goes on.
        assert await raw(port, b"\x00" * 20000) == b""
        assert await raw(port, b"GET /metr") == b""
        got = await raw(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"concur_window 2.0" in got
    assert exporter.port is None and exporter.url is None


async def test_a_session_that_fails_to_start_frees_its_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    page = httpx.MockTransport(lambda request: httpx.Response(200, text="up 1\n"))
    async with httpx.AsyncClient(transport=page) as client:
        session = ConcurSession(
            vllm_url="http://not-vllm:80", http_client=client, metrics_port=port
        )
        with pytest.raises(NotVLLMError):
            await session.__aenter__()
    assert session.closed and session.metrics_url is None
    async with ConcurSession(law=FixedLaw(1), metrics_port=port) as again:  # the port is free
        assert again.metrics_url == f"http://127.0.0.1:{port}/metrics"


@virtual_time
async def test_accept_and_gzip_are_honoured_as_prometheus_clients_exposition_does() -> None:
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

    session = ConcurSession(law=FixedLaw(2))
    async with MetricsExporter(session.statistics, port=0) as exporter:
        port = exporter.port
        assert port is not None
        plain = await raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        head, body = plain.split(b"\r\n\r\n", 1)
        assert b"Content-Type: text/plain; version=" in head and b"Content-Encoding" not in head
        assert body == exporter.render()

        asked = b"Accept: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        open_metrics = await raw(port, b"GET /metrics HTTP/1.1\r\n" + asked + b"\r\n")
        head, body = open_metrics.split(b"\r\n\r\n", 1)
        assert f"Content-Type: {OPENMETRICS}".encode() in head
        assert body.endswith(b"# EOF\n") and b"concur_window 2.0" in body

        zipped = await raw(port, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip, br\r\n\r\n")
        head, body = zipped.split(b"\r\n\r\n", 1)
        assert b"Content-Encoding: gzip" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert gzip.decompress(body) == exporter.render()

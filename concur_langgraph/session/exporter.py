"""Prometheus export of a running batch: the session's statistics at ``/metrics``.

:class:`MetricsExporter` serves ``http://127.0.0.1:PORT/metrics`` in the Prometheus text format.
Nothing is computed between scrapes: a custom collector (:class:`SessionCollector`) calls
``statistics()`` when a scrape arrives and turns that one snapshot into metric families, so a
batch nobody watches pays nothing.

Why an asyncio server on the session's own event loop, rather than prometheus_client's server
thread or uvicorn:

* ``statistics()`` reads the gate's agent map, which the event loop mutates as agents come and
  go; read from another thread it can fail mid-iteration ("dictionary changed size") or mix two
  moments. On the loop it is one consistent snapshot, with no lock on the agents' fast path;
* no hidden thread (docs/architecture.md), and the server is owned by the session: it starts
  when the session is entered and is closed when it exits;
* uvicorn's ``Server.serve`` installs its own SIGINT/SIGTERM handlers while it runs, which would
  take Ctrl-C away from the batch that must drain on it.

A scrape costs one ``statistics()`` call (O(agents) in the gate) and a few microseconds of
formatting on the loop; the HTTP side reads one request head and answers with
``Connection: close``, which is all a Prometheus scraper or ``curl`` needs.

The exported names and types are listed in ``docs/observability.md`` and in :data:`METRICS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry

from concur_langgraph.checks import check_port
from concur_langgraph.core.window import OPEN
from concur_langgraph.errors import ConfigError

if TYPE_CHECKING:
    from concur_langgraph.session.statistics import SessionStatistics

__all__ = ["METRICS", "MetricsExporter", "SessionCollector"]

logger = logging.getLogger("concur_langgraph")

HOST: Final = "127.0.0.1"
"""The exporter listens on loopback only: the statistics of a batch are not for the network
unless someone puts a proxy (or a Prometheus agent) on the same host."""

_REQUEST_HEAD_TIMEOUT_S: Final = 10.0
"""How long a connection may take to send its request head before it is dropped: a scraper
sends it at once; this only bounds idle or broken clients."""

_MAX_REQUEST_HEAD: Final = 16 * 1024
"""Largest request head accepted (a scrape's is ~200 bytes)."""

# name -> (type, help). The exposition appends ``_total`` to counters.
METRICS: Final[dict[str, tuple[str, str]]] = {
    "concur_window": (
        "gauge",
        f"Admission window: how many agents may hold a slot ({OPEN} means open).",
    ),
    "concur_window_open": ("gauge", "1 while the window is open (every agent admitted), else 0."),
    "concur_window_holders": (
        "gauge",
        "Slots held in the window (every process of a shared window).",
    ),
    "concur_agents": ("gauge", "Agents of this process by state: active, parked, waiting."),
    "concur_agents_completed": ("counter", "Agents whose run ended (any outcome)."),
    "concur_agents_in_call": (
        "gauge",
        "Agents holding a slot with an LLM call in flight (the rest are in a tool or between).",
    ),
    "concur_agent_context_tokens": (
        "gauge",
        "Sum of the agents' contexts (last prompt + completion tokens) by state: active, parked.",
    ),
    "concur_generated_tokens": ("counter", "Completion tokens of the LLM calls of this gate."),
    "concur_calls_without_usage": (
        "counter",
        "LLM calls that ended without token usage (their agents' contexts are not exact).",
    ),
    "concur_llm_calls": (
        "counter",
        "LLM calls that reached the gate (counted on arrival, before any wait).",
    ),
    "concur_parks": ("counter", "Times an agent gave its slot back and parked."),
    "concur_admissions": ("counter", "Slots granted by the window (first admissions and resumes)."),
    "concur_leader": ("gauge", "1 while this process drives a shared window (distributed only)."),
    "concur_controller_ticks": ("counter", "Controller ticks (good, stale and failed)."),
    "concur_controller_errors": ("counter", "Controller ticks whose /metrics scrape failed."),
    "concur_controller_window_changes": ("counter", "Window moves made by the control law."),
    "concur_controller_overruns": ("counter", "Ticks skipped because a tick took too long."),
    "concur_metrics_stale": (
        "gauge",
        "1 while the controller holds the window for lack of fresh vLLM data.",
    ),
    "concur_metrics_staleness_seconds": ("gauge", "Seconds since the last good vLLM sample."),
    "concur_sample_kv_usage_ratio": ("gauge", "KV-cache usage in the last sample (0..1)."),
    "concur_sample_prefix_hit_ratio": (
        "gauge",
        "Prefix-cache hit rate over the last sample's interval (absent: no queries).",
    ),
    "concur_sample_preemptions": ("gauge", "Preemptions during the last sample's interval."),
    "concur_sample_running": ("gauge", "Requests running in vLLM at the last sample."),
    "concur_sample_waiting": ("gauge", "Requests waiting in vLLM at the last sample."),
    "concur_sample_waiting_capacity": (
        "gauge",
        "Of the waiting requests, those short of KV space, at the last sample.",
    ),
    "concur_sample_kv_capacity_tokens": ("gauge", "KV-cache size in tokens (when vLLM says)."),
    "concur_sample_interval_seconds": ("gauge", "Length of the last sample's interval."),
    "concur_sample_stale": ("gauge", "1 when the last sample did not cover every endpoint."),
    "concur_replica_alive": (
        "gauge",
        "Per replica (label replica: its base URL): 1 while it takes agents, 0 once dead.",
    ),
    "concur_replica_window": ("gauge", "Per replica: its own admission window."),
    "concur_replica_agents": (
        "gauge",
        "Per replica: agents placed on it by state (active, parked, waiting).",
    ),
    "concur_replica_placed": ("counter", "Per replica: agents placed on it (re-placements too)."),
    "concur_replica_kv_usage_ratio": ("gauge", "Per replica: KV-cache usage in its last sample."),
    "concur_replica_preemptions": (
        "gauge",
        "Per replica: preemptions during its last sample's interval.",
    ),
}
"""Every metric the exporter can serve. Families whose data do not exist yet (no controller,
no sample, a hit rate over an interval without queries) are left out of a scrape rather than
exported as a made-up 0."""

AGENT_STATES: Final = ("active", "parked", "waiting")
"""Values of the ``state`` label of ``concur_agents``."""


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name][1], value=value)


def _counter(name: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, METRICS[name][1], value=value)


class SessionCollector(Collector):
    """A prometheus_client collector that reads a session's statistics at scrape time.

    Args:
        statistics: returns the snapshot to export (``ConcurSession.statistics``).
    """

    def __init__(self, statistics: Callable[[], SessionStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> list[Metric]:
        # Registering must not call collect(): the session may not be running yet.
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        gate = stats.gate
        window = gate.window
        yield _gauge("concur_window", window.limit)
        yield _gauge("concur_window_open", 1.0 if window.limit >= OPEN else 0.0)
        yield _gauge("concur_window_holders", window.holders)
        agents = GaugeMetricFamily("concur_agents", METRICS["concur_agents"][1], labels=["state"])
        for state, count in zip(
            AGENT_STATES, (gate.active, gate.parked, gate.waiting), strict=True
        ):
            agents.add_metric([state], count)
        yield agents
        yield _counter("concur_agents_completed", gate.completed)
        yield _gauge("concur_agents_in_call", gate.in_call)
        tokens = GaugeMetricFamily(
            "concur_agent_context_tokens",
            METRICS["concur_agent_context_tokens"][1],
            labels=["state"],
        )
        tokens.add_metric(["active"], gate.tokens_active)
        tokens.add_metric(["parked"], gate.tokens_parked)
        yield tokens
        yield _counter("concur_generated_tokens", gate.tokens_generated)
        yield _counter("concur_calls_without_usage", gate.usage_missing)
        yield _counter("concur_llm_calls", gate.llm_calls)
        yield _counter("concur_parks", gate.parks_total)
        yield _counter("concur_admissions", window.admitted_total)
        if stats.leader is not None:
            yield _gauge("concur_leader", 1.0 if stats.leader else 0.0)
        if stats.replicas:
            yield from _replica_families(stats)
        controller = stats.controller
        if controller is None:
            return
        yield _counter("concur_controller_ticks", controller.ticks)
        yield _counter("concur_controller_errors", controller.errors)
        yield _counter("concur_controller_window_changes", controller.changes)
        yield _counter("concur_controller_overruns", controller.overruns)
        yield _gauge("concur_metrics_stale", 1.0 if controller.stale else 0.0)
        yield _gauge("concur_metrics_staleness_seconds", controller.staleness_s)
        sample = controller.last_sample
        if sample is None:
            return
        yield _gauge("concur_sample_kv_usage_ratio", sample.kv_usage)
        if sample.prefix_hit_rate is not None:
            yield _gauge("concur_sample_prefix_hit_ratio", sample.prefix_hit_rate)
        yield _gauge("concur_sample_preemptions", sample.preemptions)
        yield _gauge("concur_sample_running", sample.running)
        yield _gauge("concur_sample_waiting", sample.waiting)
        if sample.waiting_capacity is not None:
            yield _gauge("concur_sample_waiting_capacity", sample.waiting_capacity)
        if sample.kv_capacity_tokens is not None:
            yield _gauge("concur_sample_kv_capacity_tokens", sample.kv_capacity_tokens)
        if sample.interval_s is not None:
            yield _gauge("concur_sample_interval_seconds", sample.interval_s)
        yield _gauge("concur_sample_stale", 1.0 if sample.stale else 0.0)


def _replica_families(stats: SessionStatistics) -> Iterator[Metric]:
    """The per-replica families (a batch on several replicas), labelled by base URL."""

    def family(name: str, labels: tuple[str, ...] = ("replica",)) -> Any:
        kind, text = METRICS[name]
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return cls(name, text, labels=list(labels))

    alive, window, placed = (
        family("concur_replica_alive"),
        family("concur_replica_window"),
        family("concur_replica_placed"),
    )
    agents = family("concur_replica_agents", ("replica", "state"))
    usage, preemptions = (
        family("concur_replica_kv_usage_ratio"),
        family("concur_replica_preemptions"),
    )
    for replica in stats.replicas:
        url, gate = replica.url, replica.gate
        alive.add_metric([url], 1.0 if replica.alive else 0.0)
        window.add_metric([url], gate.window.limit)
        placed.add_metric([url], replica.placed_total)
        for state, count in zip(
            AGENT_STATES, (gate.active, gate.parked, gate.waiting), strict=True
        ):
            agents.add_metric([url, state], count)
        sample = replica.controller.last_sample if replica.controller is not None else None
        if sample is not None:
            usage.add_metric([url], sample.kv_usage)
            preemptions.add_metric([url], sample.preemptions)
    yield from (alive, window, agents, placed, usage, preemptions)


class MetricsExporter:
    """Serves a session's statistics at ``http://127.0.0.1:PORT/metrics`` while entered.

    Args:
        statistics: the snapshot to export at each scrape (``ConcurSession.statistics``).
        port: the TCP port; 0 picks a free one (read it back from :attr:`port`).

    ``async with exporter:`` (or :meth:`start` / :meth:`aclose`) binds and serves on the
    running event loop. A port already in use raises :class:`ConfigError` naming
    ``metrics_port``.
    """

    def __init__(self, statistics: Callable[[], SessionStatistics], *, port: int = 0) -> None:
        self._requested_port = check_port("metrics_port", port)
        self._registry = CollectorRegistry()
        self._registry.register(SessionCollector(statistics))
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int | None:
        """The port being served (the one picked, for port 0); ``None`` when not serving."""
        return self._port

    @property
    def url(self) -> str | None:
        """``http://127.0.0.1:PORT/metrics`` while serving, else ``None``."""
        return None if self._port is None else f"http://{HOST}:{self._port}/metrics"

    def render(self) -> bytes:
        """The exposition a scrape would get now."""
        return generate_latest(self._registry)

    async def start(self) -> None:
        """Bind the port and serve; :class:`ConfigError` if the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError("MetricsExporter.start() called twice")
        try:
            server = await asyncio.start_server(
                self._handle, HOST, self._requested_port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"metrics_port: port {self._requested_port} on {HOST} is already in use; "
                    "choose another port, or 0 for a free one"
                ) from exc
            raise ConfigError(
                f"metrics_port: cannot listen on {HOST}:{self._requested_port}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        logger.info("concur: serving batch metrics on %s", self.url)

    async def aclose(self) -> None:
        """Stop listening and drop the connections in progress (idempotent)."""
        server, self._server = self._server, None
        self._port = None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers)
        await server.wait_closed()

    async def __aenter__(self) -> MetricsExporter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._answer(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            # A client that went away or sent garbage: nothing to answer, nothing to log.
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(_REQUEST_HEAD_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, sep, value in (line.partition(":") for line in header_lines)
            if sep
        }
        parts = request_line.split()
        method, target = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        path = target.split("?", 1)[0]
        extra = ""
        if method not in ("GET", "HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"only GET /metrics\n", "text/plain"
        elif path != "/metrics":
            status, body, ctype = "404 Not Found", b"the metrics are at /metrics\n", "text/plain"
        else:
            # As prometheus_client's own exposition does: the format the Accept header asks
            # for (Prometheus text, or OpenMetrics), gzip when the scraper accepts it.
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            status, body = "200 OK", encoder(self._registry)
            if gzip_accepted(headers.get("accept-encoding", "")):
                body, extra = gzip.compress(body), "Content-Encoding: gzip\r\n"
        header = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if method == "HEAD" else header + body)
        await writer.drain()

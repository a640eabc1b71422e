"""The simulator speaking SGLang's /metrics, against the page SGLang's own code renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import MetricsSource, vtime
from concur_langgraph.errors import ConfigError
from concur_langgraph.sim import SimServer, create_app, get_preset, render_sglang_metrics
from concur_langgraph.sim._faults import Faults, truncate_page
from concur_langgraph.sim._metrics import METRICS_CONTENT_TYPE

REAL = (Path(__file__).parent.parent / "data" / "sglang_0.5.23_metrics.txt").read_text()


def _families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _label_names(family: Metric) -> set[frozenset[str]]:
    return {frozenset(s.labels) - {"le", "pid"} for s in family.samples}


async def _traffic(server: SimServer, n: int = 3) -> list[dict[str, Any]]:
    usages = []
    async with server.http_client() as client:
        for i in range(n):
            body = {
                "model": server.model_name,
                "messages": [{"role": "user", "content": "shared prefix " * 100 + str(i)}],
                "max_tokens": 10,
                "ignore_eos": True,
            }
            answer = await client.post("/v1/chat/completions", json=body)
            usages.append(answer.json()["usage"])
    return usages


def _page(server: SimServer) -> tuple[str, str]:
    async def main() -> tuple[str, str]:
        await _traffic(server)
        async with server.http_client() as client:
            response = await client.get("/metrics")
        await server.aclose()
        return response.text, response.headers["content-type"]

    return vtime.run(main())


def test_every_family_we_emit_exists_in_sglang_with_the_same_type_help_and_labels() -> None:
    text, content_type = _page(SimServer("test-tiny", engine="sglang"))
    assert content_type == METRICS_CONTENT_TYPE
    ours, real = _families(text), _families(REAL)
    assert ours and all(name.startswith("sglang:") for name in ours)
    for name, family in ours.items():
        assert name in real, f"{name} is not an SGLang 0.5.23 series"
        assert family.type == real[name].type, name
        assert family.documentation == real[name].documentation, name
        assert _label_names(family) == _label_names(real[name]), name
    # Multiprocess-mode counters: no `_created` series, as SGLang's page.
    assert "_created" not in text


def test_values_follow_the_engine() -> None:
    server = SimServer("test-tiny", engine="sglang")
    text, _ = _page(server)
    metrics = server.engine.metrics()
    samples = {
        (s.name, s.labels.get("mode")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    queries, hits = metrics.prefix_cache_queries, metrics.prefix_cache_hits
    assert hits > 0
    assert samples[("sglang:prefill_effective_tokens_total", "input")] == queries - hits
    assert samples[("sglang:prefill_effective_tokens_total", "device_hit")] == hits
    assert samples[("sglang:realtime_tokens_total", "decode")] == 30
    assert samples[("sglang:num_requests_total", None)] == 3
    assert (
        samples[("sglang:max_total_num_tokens", None)] == get_preset("test-tiny").kv_capacity_tokens
    )
    assert samples[("sglang:cache_hit_rate", None)] == pytest.approx(hits / queries)
    assert samples[("sglang:token_usage", None)] == metrics.kv_cache_usage


def test_the_hit_rate_gauge_holds_between_prefills_and_follows_the_last_ones() -> None:
    config = get_preset("test-tiny")
    metrics: Any = None

    async def main() -> list[float]:
        nonlocal metrics
        rates = []
        async with SimServer(config, engine="sglang") as server:
            async with server.http_client() as client:

                async def rate() -> float:
                    text = (await client.get("/metrics")).text
                    fam = _families(text)["sglang:cache_hit_rate"]
                    return float(fam.samples[0].value)

                rates.append(await rate())  # nothing prefilled: 0, as SGLang starts
                await _traffic(server, 1)  # a cold prompt: no hit
                rates.append(await rate())
                rates.append(await rate())  # no prefill since: held
                await _traffic(server, 1)  # the same prefix again: hits
                rates.append(await rate())
        return rates

    rates = vtime.run(main())
    assert rates[0] == 0.0 and rates[1] == 0.0 and rates[2] == rates[1]
    assert rates[3] > 0.5


def test_truncated_fault_cuts_an_sglang_page_after_its_usage_gauge() -> None:
    page = render_sglang_metrics(SimServer("test-tiny").engine.metrics(), hit_rate=0.0)
    cut = truncate_page(page).decode()
    assert cut.rstrip().splitlines()[-1].startswith("sglang:token_usage{")
    assert "sglang:prefill_effective_tokens_total" not in cut


def test_the_engine_switch_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^engine: must be one of vllm, sglang, got 'tgi'"):
        SimServer("test-tiny", engine="tgi")
    with pytest.raises(ConfigError, match=r"^exposition: must be one of"):
        create_app(SimServer("test-tiny").engine, exposition="x")


def test_the_projects_source_reads_the_sglang_simulator_through_faults() -> None:
    async def main() -> tuple[float, int | None, bool]:
        async with (
            SimServer("test-tiny", engine="sglang", faults=Faults()) as server,
            server.http_client() as client,
        ):
            source = MetricsSource(server.root_url, client=client)
            await source.start()
            await _traffic(server)
            server.faults.set(Faults(metrics="truncated"))
            stale = (await source.sample(1.0)).stale
            server.faults.clear()
            sample = await source.sample(2.0)
            return sample.kv_usage, sample.kv_capacity_tokens, stale

    usage, capacity, stale = vtime.run(main())
    assert usage == 0.0 and capacity == get_preset("test-tiny").kv_capacity_tokens
    assert stale  # an incomplete SGLang page is not data either

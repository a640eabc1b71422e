"""The real vLLM CPU server answers like the vLLM our users run, and shows KV pressure.

These pin down the facts the signal source, the gate and the simulator rely on: usage with
``cached_tokens``, the /metrics series and labels, the cache geometry, and that an
oversubscribed workload produces real preemptions and a measurable prefix-cache hit rate.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph.testing.vllm_cpu import RunningServer

DATA = Path(__file__).resolve().parents[1] / "data" / "vllm_cpu_0.32.0_metrics.txt"
BLOCK_SIZE = 128  # vLLM's CPU default
KV_TOKENS = 4096  # 16 MiB at 4 KiB per token

# Series the simulator mimics (name as it appears on the sample line) and their type.
MIMICKED = {
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge",
    "vllm:num_preemptions_total": "counter",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:prompt_tokens_cached_total": "counter",
    "vllm:cache_config_info": "gauge",
    "vllm:request_num_preemptions": "histogram",
}

_nonce = itertools.count()


def _unique(text: str) -> str:
    # A fresh first block, so no earlier test's cached prefix can hit.
    return f"run {next(_nonce)} {id(_nonce)} {text}"


def _samples(exposition: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _types(exposition: str) -> dict[str, str]:
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            types.setdefault(sample.name, family.type)
    return types


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in samples[name])


async def _metrics(client: httpx.AsyncClient, server: RunningServer) -> str:
    response = await client.get(f"{server.base_url}/metrics")
    response.raise_for_status()
    return response.text


async def _chat(
    client: httpx.AsyncClient, server: RunningServer, messages: list[dict[str, str]], tokens: int
) -> dict[str, object]:
    body = {
        "model": server.model,
        "messages": messages,
        "max_tokens": tokens,
        "ignore_eos": True,  # random weights: lengths are set by max_tokens, not by EOS
    }
    response = await client.post(f"{server.openai_base_url}/chat/completions", json=body)
    response.raise_for_status()
    result: dict[str, object] = response.json()
    return result


async def test_chat_usage_reports_cached_prefix_tokens(real_vllm: RunningServer) -> None:
    system = _unique("You are a careful agent that explains the cache. " * 30)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
    async with httpx.AsyncClient(timeout=60) as client:
        first = await _chat(client, real_vllm, messages, 8)
        second = await _chat(client, real_vllm, messages, 8)

    usage1, usage2 = first["usage"], second["usage"]
    assert isinstance(usage1, dict) and isinstance(usage2, dict)
    assert usage1["completion_tokens"] == 8  # ignore_eos honoured
    assert usage1["prompt_tokens"] == usage2["prompt_tokens"] > BLOCK_SIZE
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0
    cached = usage2["prompt_tokens_details"]["cached_tokens"]
    # Only whole blocks hit, and at least the last prompt token is always recomputed.
    assert cached > 0
    assert cached % BLOCK_SIZE == 0
    assert cached < usage2["prompt_tokens"]


async def test_metrics_have_the_series_the_simulator_mimics(real_vllm: RunningServer) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        await _chat(client, real_vllm, [{"role": "user", "content": _unique("hi")}], 4)
        exposition = await _metrics(client, real_vllm)

    samples = _samples(exposition)
    types = _types(exposition)
    for name, kind in MIMICKED.items():
        if kind == "histogram":
            assert f"{name}_count" in samples, name
            assert types[f"{name}_count"] == "histogram"
        else:
            assert name in samples, name
            assert types[name] == kind, name
        for labels, _ in samples.get(name, samples.get(f"{name}_count", [])):
            assert labels["engine"] == "0"
            # cache_config_info is per engine, not per model: it has no model_name label.
            assert labels.get("model_name") == (
                None if name == "vllm:cache_config_info" else real_vllm.model
            )

    reasons = {labels["reason"] for labels, _ in samples["vllm:num_requests_waiting_by_reason"]}
    assert reasons == {"capacity", "deferred"}
    (info, value), *_ = samples["vllm:cache_config_info"]
    assert value == 1.0
    assert int(info["block_size"]) == BLOCK_SIZE
    assert int(info["num_gpu_blocks"]) * BLOCK_SIZE == KV_TOKENS
    assert int(info["kv_cache_size_tokens"]) == KV_TOKENS
    assert info["enable_prefix_caching"] == "True"
    assert _total(samples, "vllm:generation_tokens_total") >= 4
    # Removed in vLLM 0.12; the signal source must not need them.
    assert "vllm:gpu_cache_usage_perc" not in samples


async def test_captured_exposition_matches_the_live_server(real_vllm: RunningServer) -> None:
    """tests/data holds a capture from this pinned build; it must stay representative."""
    async with httpx.AsyncClient(timeout=60) as client:
        live = _types(await _metrics(client, real_vllm))
    captured = _types(DATA.read_text())
    mimicked_samples = {n for n in captured if any(n.startswith(m) for m in MIMICKED)}
    assert mimicked_samples
    for name in mimicked_samples:
        assert live.get(name) == captured[name], name


async def _growing_chat(
    client: httpx.AsyncClient, server: RunningServer, agent: int, turns: int, tokens: int
) -> list[dict[str, object]]:
    messages = [{"role": "system", "content": "You are a helpful agent. " * 20}]
    usages = []
    for turn in range(turns):
        messages.append(
            {"role": "user", "content": f"agent {agent} step {turn} " + "tell me more " * 15}
        )
        reply = await _chat(client, server, messages, tokens)
        choices = reply["choices"]
        assert isinstance(choices, list)
        messages.append({"role": "assistant", "content": choices[0]["message"]["content"]})
        usage = reply["usage"]
        assert isinstance(usage, dict)
        usages.append(usage)
    return usages


@pytest.mark.timeout(240)
async def test_oversubscribed_workload_preempts_and_hits_prefix_cache(
    real_vllm: RunningServer,
) -> None:
    """16 agents x 6 growing turns need ~10x the 4096-token cache: vLLM must preempt."""
    agents, turns, tokens = 16, 6, 96
    async with httpx.AsyncClient(timeout=180) as client:
        before = _samples(await _metrics(client, real_vllm))
        runs = await asyncio.gather(
            *(_growing_chat(client, real_vllm, a, turns, tokens) for a in range(agents))
        )
        after = _samples(await _metrics(client, real_vllm))

    def delta(name: str) -> float:
        return _total(after, name) - _total(before, name)

    usages = [u for run in runs for u in run]
    assert len(usages) == agents * turns
    assert all(u["completion_tokens"] == tokens for u in usages)
    # The last turn's contexts together are several times the cache.
    last_prompts = sum(int(run[-1]["prompt_tokens"]) for run in runs)  # type: ignore[call-overload]
    assert last_prompts > 2 * KV_TOKENS

    assert delta("vllm:num_preemptions_total") > 0
    queries = delta("vllm:prefix_cache_queries_total")
    hits = delta("vllm:prefix_cache_hits_total")
    assert queries >= sum(int(u["prompt_tokens"]) for u in usages)  # type: ignore[call-overload]
    assert 0 < hits < queries
    assert delta("vllm:generation_tokens_total") >= agents * turns * tokens
    # The cached tokens reported to clients are the hits the server counted.
    reported = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)  # type: ignore[index]
    assert reported == delta("vllm:prompt_tokens_cached_total")

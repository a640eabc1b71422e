"""Measure prefill and decode timings of a real vLLM server (simulator calibration input).

Not a test (pytest does not collect it): a script that reports numbers. Usage::

    python -m concur_langgraph.testing.vllm_cpu serve        # prints base_url
    python tests/real_vllm/measure_timings.py http://127.0.0.1:PORT [--repeats 5]

Prompts are token-id lists sent to ``/v1/completions`` so their lengths are exact, and each
starts with fresh random ids so that no prefix-cache block can hit. Prefill: latency of a
``max_tokens=1`` request at batch 1, minus nothing (the 1-token row shows the fixed overhead).
Decode: ``b`` concurrent requests of 16 prompt tokens and ``--decode-tokens`` outputs
(``ignore_eos``), minus the same batch with 1 output token, divided by the extra tokens: the
time of one decode step of the whole batch (streamed chunk times are useless for this: the
server flushes chunks in bursts). 16 + 110 tokens fit one 128-token block, so even 16
requests use half of a 4096-token cache and nothing is preempted. Last, the tier's
oversubscribed workload (16 agents x 6 growing turns x 64 tokens): wall time, tokens/s,
preemptions, prefix hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

VOCAB = 2048
FIRST_ID = 6  # ids below are the tokenizer's special tokens


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(FIRST_ID, VOCAB) for _ in range(n)]


async def _prefill_once(client: httpx.AsyncClient, url: str, ids: list[int]) -> float:
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "ignore_eos": True}
    t0 = time.perf_counter()
    response = await client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - t0


async def _batch_wall(
    client: httpx.AsyncClient, url: str, prompts: list[list[int]], max_tokens: int
) -> float:
    async def one(ids: list[int]) -> None:
        body = {"model": "tiny", "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True}
        response = await client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(ids) for ids in prompts))
    return time.perf_counter() - t0


async def measure(url: str, repeats: int, decode_tokens: int) -> dict[str, object]:
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=600) as client:
        await _prefill_once(client, url, _prompt(rng, 8))  # warm-up
        prefill = {}
        for n in (1, 64, 128, 256, 512, 1024, 1536, 2000):
            samples = [await _prefill_once(client, url, _prompt(rng, n)) for _ in range(repeats)]
            prefill[n] = round(statistics.median(samples) * 1000, 2)
        decode = {}
        for batch in (1, 2, 4, 8, 16):
            per_step: list[float] = []
            for _ in range(repeats):
                # Fresh prompts for both runs, so each pays one full prefill: the difference
                # is (max_tokens - 1) decode steps of the whole batch.
                full = await _batch_wall(
                    client, url, [_prompt(rng, 16) for _ in range(batch)], decode_tokens
                )
                short = await _batch_wall(client, url, [_prompt(rng, 16) for _ in range(batch)], 1)
                per_step.append((full - short) / (decode_tokens - 1))
            decode[batch] = round(statistics.median(per_step) * 1000, 3)
        workload = await _growing_chats(client, url, agents=16, turns=6, tokens=64)
    # Least-squares line through the prefill medians: the simulator's cost-model shape.
    xs, ys = list(prefill), list(prefill.values())
    slope, intercept = statistics.linear_regression(xs, ys)
    return {
        "prefill_ms_by_prompt_tokens": prefill,
        "prefill_fit_ms": {"fixed": round(intercept, 2), "per_token": round(slope, 4)},
        "decode_step_ms_by_batch": decode,
        "growing_chats_16x6x64": workload,
    }


def _counter(exposition: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(name + "{")
    )


async def _growing_chats(
    client: httpx.AsyncClient, url: str, *, agents: int, turns: int, tokens: int
) -> dict[str, float]:
    """The tier's oversubscribed workload: wall time, generated tokens/s, preemptions, hits."""

    async def agent(i: int) -> None:
        messages = [{"role": "system", "content": "You are a helpful agent. " * 20}]
        for turn in range(turns):
            text = f"agent {i} step {turn} " + "tell me more " * 15
            messages.append({"role": "user", "content": text})
            body = {"model": "tiny", "messages": messages, "max_tokens": tokens, "ignore_eos": True}
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            reply = response.json()["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": reply})

    names = (
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    )
    before_text = (await client.get(f"{url}/metrics")).text
    t0 = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(agents)))
    wall = time.perf_counter() - t0
    after_text = (await client.get(f"{url}/metrics")).text
    delta = {n: _counter(after_text, n) - _counter(before_text, n) for n in names}
    return {
        "wall_s": round(wall, 2),
        "generated_tok_per_s": round(delta["vllm:generation_tokens_total"] / wall, 1),
        "prompt_tok_per_s": round(delta["vllm:prompt_tokens_total"] / wall, 1),
        "preemptions": delta["vllm:num_preemptions_total"],
        "prefix_hit_rate": round(
            delta["vllm:prefix_cache_hits_total"] / delta["vllm:prefix_cache_queries_total"], 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=110)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.url, args.repeats, args.decode_tokens)), indent=1))


if __name__ == "__main__":
    main()

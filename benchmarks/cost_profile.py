"""The cost profile of a real vLLM server: prefill rate, and decode rate by batch and context.

What docs/real-vllm.md ("The medium model") reports, measured model-free through the
OpenAI-compatible API (``/v1/completions`` with token-id prompts, so lengths are exact; each
prompt starts with fresh random ids, so no prefix-cache block can hit):

* **prefill**: one request at a time, ``max_tokens=1``, prompts of ``--prefill`` tokens; the
  latency, its rate (tokens / latency), and a least-squares line ``latency = fixed + tokens /
  rate`` whose rate is the marginal prefill rate (the fixed part is HTTP, tokenisation,
  scheduling and the one sampled token). Prompts above the server's token budget per step
  (2048 on CPU) are prefilled in chunks.
* **decode by batch**: ``b`` concurrent requests of 32-token prompts, run twice with
  ``--decode-tokens`` = (short, long) outputs (``ignore_eos``); the difference of the two
  durations over the difference of outputs is one decode step of the whole batch, with the
  prefill and the HTTP overhead cancelled. Rate: ``b`` tokens per step.
* **decode by context**: the same at longer prompts (``--contexts``, ``batch x context``
  pairs): how a decode step grows with the context it reads (attention and KV reads on a CPU).

Every measurement is one JSON line in ``--out`` (with the load average around it); the
summary (medians over ``--rounds``) is printed as markdown.

    python benchmarks/cost_profile.py --serve                  # starts the medium server
    python benchmarks/cost_profile.py --url http://127.0.0.1:PORT --rounds 3

Keep the KV cache larger than every batch: ``b x (context + long output)`` tokens in blocks of
128 must fit, or preemptions spoil the long run (the defaults fit the medium server's 8192
tokens). Real timings are noisy on a shared machine: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
FIRST_ID = 6  # ids below are the tokenizer's special tokens (make_tiny_model.py)
VOCAB = 2048
PREFILL = (1, 256, 512, 1024, 2048, 3072)
BATCHES = (1, 4, 8, 16, 24)
CONTEXTS = ((1, 1024), (1, 2048), (1, 3584), (4, 1536), (8, 640))
DECODE_TOKENS = (16, 208)


def _load() -> float:
    return os.getloadavg()[0]


class Probe:
    """Timed completions against one server."""

    def __init__(self, client: httpx.AsyncClient, root: str, model: str, seed: int) -> None:
        self.client = client
        self.root = root
        self.model = model
        self.rng = random.Random(seed)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(FIRST_ID, VOCAB) for _ in range(n)]

    async def complete(self, ids: list[int], max_tokens: int) -> None:
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True}
        response = await self.client.post(f"{self.root}/v1/completions", json=body)
        response.raise_for_status()
        usage = response.json()["usage"]
        if usage["completion_tokens"] != max_tokens:
            raise RuntimeError(f"asked {max_tokens} tokens, got {usage['completion_tokens']}")

    async def batch(self, batch: int, context: int, max_tokens: int) -> float:
        prompts = [self.prompt(context) for _ in range(batch)]
        t0 = time.perf_counter()
        await asyncio.gather(*(self.complete(ids, max_tokens) for ids in prompts))
        return time.perf_counter() - t0

    async def preemptions(self) -> float:
        text = (await self.client.get(f"{self.root}/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:num_preemptions_total{")
        )


async def _served_model(client: httpx.AsyncClient, root: str) -> str:
    response = await client.get(f"{root}/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def measure_round(
    url: str,
    *,
    round_: int,
    prefill: Sequence[int],
    batches: Sequence[int],
    contexts: Sequence[tuple[int, int]],
    decode_tokens: tuple[int, int],
) -> list[dict[str, Any]]:
    """One round of every measurement; one row each."""
    root = url.rstrip("/").removesuffix("/v1")
    rows: list[dict[str, Any]] = []
    short, long = decode_tokens
    async with httpx.AsyncClient(timeout=900.0) as client:
        model = await _served_model(client, root)
        probe = Probe(client, root, model, seed=1000 + round_)
        await probe.batch(1, 16, 2)  # warm-up
        for n in prefill:
            load0 = _load()
            seconds = await probe.batch(1, n, 1)
            rows.append(
                {"kind": "prefill", "tokens": n, "latency_s": seconds, "load": [load0, _load()]}
            )
            print(f"  prefill {n:>5} tokens: {seconds * 1e3:8.1f} ms", file=sys.stderr, flush=True)
        pairs = [(b, 32) for b in batches] + [tuple(c) for c in contexts]
        for b, ctx in pairs:
            load0 = _load()
            before = await probe.preemptions()
            first = await probe.batch(b, ctx, short)
            second = await probe.batch(b, ctx, long)
            preempted = await probe.preemptions() - before
            step = (second - first) / (long - short)
            rows.append(
                {
                    "kind": "decode",
                    "batch": b,
                    "context": ctx,
                    "step_s": step,
                    "short_s": first,
                    "long_s": second,
                    "outputs": [short, long],
                    "preemptions": preempted,
                    "load": [load0, _load()],
                }
            )
            print(
                f"  decode batch {b:>2} context {ctx:>5}: {step * 1e3:7.2f} ms/step "
                f"({b / step:6.1f} tokens/s){'  PREEMPTED' if preempted else ''}",
                file=sys.stderr,
                flush=True,
            )
    for row in rows:
        row.update(round=round_, model=model, url=root)
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, and the prefill line fitted on every prefill row."""
    prefill: dict[int, list[float]] = {}
    for r in rows:
        if r["kind"] == "prefill":
            prefill.setdefault(r["tokens"], []).append(r["latency_s"])
    decode: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["kind"] == "decode" and not r["preemptions"]:
            decode.setdefault((r["batch"], r["context"]), []).append(r["step_s"])
    xs = [float(r["tokens"]) for r in rows if r["kind"] == "prefill"]
    ys = [r["latency_s"] for r in rows if r["kind"] == "prefill"]
    fit = None
    if len(set(xs)) >= 2:
        slope, intercept = statistics.linear_regression(xs, ys)
        fit = {"fixed_s": intercept, "per_token_s": slope, "rate_tokens_per_s": 1 / slope}
    loads = [x for r in rows for x in r["load"]]
    return {
        "prefill": {
            n: {
                "median_s": statistics.median(v),
                "min_s": min(v),
                "max_s": max(v),
                "tokens_per_s": n / statistics.median(v),
                "n": len(v),
            }
            for n, v in sorted(prefill.items())
        },
        "prefill_fit": fit,
        "decode": {
            key: {
                "median_step_s": statistics.median(v),
                "min_step_s": min(v),
                "max_step_s": max(v),
                "tokens_per_s": key[0] / statistics.median(v),
                "n": len(v),
            }
            for key, v in sorted(decode.items())
        },
        "load_range": [min(loads), max(loads)] if loads else None,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| prompt tokens (batch 1, 1 output) | latency, ms (min-max) | tokens/s |",
        "|---|---|---|",
    ]
    for n, p in result["prefill"].items():
        lines.append(
            f"| {n:,} | {p['median_s'] * 1e3:,.0f} "
            f"({p['min_s'] * 1e3:,.0f}-{p['max_s'] * 1e3:,.0f}) | {p['tokens_per_s']:,.0f} |"
        )
    fit = result["prefill_fit"]
    if fit is not None:
        lines += [
            "",
            f"Prefill line: latency = {fit['fixed_s'] * 1e3:.0f} ms + tokens / "
            f"{fit['rate_tokens_per_s']:,.0f} tokens/s.",
        ]
    lines += [
        "",
        "| decode batch | context | ms per step (min-max) | tokens/s |",
        "|---|---|---|---|",
    ]
    for (b, ctx), d in result["decode"].items():
        lines.append(
            f"| {b} | {ctx:,} | {d['median_step_s'] * 1e3:.1f} ({d['min_step_s'] * 1e3:.1f}-"
            f"{d['max_step_s'] * 1e3:.1f}) | {d['tokens_per_s']:,.0f} |"
        )
    if result["load_range"] is not None:
        low, high = result["load_range"]
        lines += ["", f"Load average (1 min) during the measurements: {low:.1f}-{high:.1f}."]
    return "\n".join(lines) + "\n"


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, _, ctx = part.strip().partition("x")
        out.append((int(b), int(ctx)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running vLLM server")
    where.add_argument(
        "--serve", action="store_true", help="start the helper's server (--model) for the run"
    )
    parser.add_argument("--model", default="medium", help="--serve: tiny or medium (default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", default=",".join(map(str, PREFILL)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument(
        "--contexts",
        default=",".join(f"{b}x{c}" for b, c in CONTEXTS),
        help="decode at longer contexts: BATCHxCONTEXT, comma-separated",
    )
    parser.add_argument("--decode-tokens", default=",".join(map(str, DECODE_TOKENS)))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "medium-profile.jsonl")
    args = parser.parse_args(argv)
    short, long = (int(x) for x in args.decode_tokens.split(","))
    server = None
    url = args.url
    if args.serve:
        from concur_langgraph.testing.vllm_cpu import VLLMServerConfig, start_server

        server = start_server(VLLMServerConfig(model=args.model))
        url = server.base_url
    rows: list[dict[str, Any]] = []
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} (load {_load():.1f})", file=sys.stderr)
            got = asyncio.run(
                measure_round(
                    url,
                    round_=r,
                    prefill=[int(x) for x in args.prefill.split(",")],
                    batches=[int(x) for x in args.batches.split(",")],
                    contexts=_pairs(args.contexts) if args.contexts else [],
                    decode_tokens=(short, long),
                )
            )
            with args.out.open("a", encoding="utf-8") as out:
                for row in got:
                    out.write(json.dumps(row, sort_keys=True) + "\n")
            rows += got
    finally:
        if server is not None:
            server.stop()
    print(markdown(summary(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

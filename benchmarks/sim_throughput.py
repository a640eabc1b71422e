"""How fast the simulator simulates: a thrashing 256-agent batch over HTTP, in virtual time.

Usage: .venv/bin/python benchmarks/sim_throughput.py [--agents 256] [--steps 20]
       [--preset h100-qwen3-32b-tp2]

Each agent sends its growing conversation through httpx (ASGITransport) to the simulator's
OpenAI-compatible app: a 500-token shared system prompt, a 200-token task, then per step 100
generated tokens (ignore_eos) and a 650-token tool observation after a 0.5-3 s tool pause, so
contexts grow to ~16k tokens. Prints wall time, simulated time and engine steps per wall second.
The client here is plain httpx: the openai SDK and LangChain add their own per-call cost on top
(docs/simulator.md, "Performance").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from typing import Any

import httpx

from concur_langgraph import vtime
from concur_langgraph.sim import SimServer


async def _agent(client: httpx.AsyncClient, i: int, model: str, steps: int) -> dict[str, Any]:
    rng = random.Random(i)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": " ".join(f"sys{j}" for j in range(500))},
        {"role": "user", "content": f"task {i} " + " ".join(
            f"t{rng.randrange(5000)}" for _ in range(200))},
    ]  # fmt: skip
    usage: dict[str, Any] = {}
    for _ in range(steps):
        response = await client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": 100, "ignore_eos": True},
        )
        response.raise_for_status()
        body = response.json()
        usage = body["usage"]
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        await asyncio.sleep(rng.uniform(0.5, 3.0))  # the tool call
        observation = " ".join(f"o{rng.randrange(20000)}" for _ in range(650))
        messages.append({"role": "user", "content": observation})
    return usage


async def _main(agents: int, steps: int, preset: str) -> dict[str, Any]:
    async with SimServer(preset) as server, server.http_client() as client:
        t0 = time.perf_counter()
        usages = await asyncio.gather(
            *(_agent(client, i, server.model_name, steps) for i in range(agents))
        )
        wall = time.perf_counter() - t0
        m = server.engine.metrics()
        return {
            "agents": agents,
            "steps": steps,
            "preset": preset,
            "wall_s": round(wall, 1),
            "simulated_s": round(asyncio.get_running_loop().time(), 1),
            "engine_steps": m.num_steps,
            "engine_steps_per_wall_s": round(m.num_steps / wall),
            "last_prompt_tokens": max(u["prompt_tokens"] for u in usages),
            "preemptions": m.num_preemptions,
            "prefix_hit_rate": round(m.prefix_cache_hits / max(1, m.prefix_cache_queries), 3),
            "machine": f"{platform.machine()}, {platform.python_version()}",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="h100-qwen3-32b-tp2")
    args = parser.parse_args()
    print(json.dumps(vtime.run(_main(args.agents, args.steps, args.preset)), indent=2))


if __name__ == "__main__":
    main()

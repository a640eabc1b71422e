"""Several replicas: one window per replica, each agent sticky to one, calls routed by agent.

    python examples/replicas.py --url http://127.0.0.1:8000 --url http://127.0.0.1:8001 \\
        --model tiny

Two changes from one server: `vllm_url` lists every replica, and the model's HTTP client is
`routed_http_client()`, which sends each agent's calls to the replica the gate placed it on.
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
from _agent import build_graph, make_model, tasks

from concur_langgraph import ConcurGate, routed_http_client


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", required=True, help="a replica's base URL")
    parser.add_argument("--model", default="tiny", help="served model name")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    # One connection per agent at most: the pool must not cap the batch.
    limits = httpx.Limits(max_connections=args.agents + 16)
    async with routed_http_client(limits=limits, timeout=600) as client:
        graph = build_graph(make_model(args.url[0], args.model, http_client=client))
        gate = ConcurGate(graph, vllm_url=args.url)
        results = await gate.abatch(tasks(args.agents, args.steps), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{len(results) - len(failed)} agents finished, {len(failed)} failed")
    for replica in gate.statistics().replicas:
        print(replica)


if __name__ == "__main__":
    asyncio.run(main())

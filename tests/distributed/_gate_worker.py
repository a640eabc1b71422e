"""A worker process of the end-to-end test: ConcurGate on a shared RedisWindow, real HTTP to a
simulated vLLM served by ``concur sim serve`` (run as a script, not collected).

Prints one JSON line: ``{"ev": "results", "n": ..., "complete": ..., "stats": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from concur_langgraph import ConcurGate, FixedLaw, RedisWindow
from concur_langgraph.testing.agent_loop import observation_loop


async def main(args: argparse.Namespace) -> None:
    model = ChatOpenAI(
        model=args.model,
        base_url=f"{args.sim}/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=args.max_tokens,  # type: ignore[call-arg]
        max_retries=0,
        timeout=120,
        extra_body={"ignore_eos": True},
    )
    graph = observation_loop(model, steps=args.steps, tool_s=args.tool_s)
    # The default lease (10 s): four client stacks on a loaded 2-core box can stall a loop for
    # seconds, and a lapsed lease costs a re-queue.
    async with RedisWindow(args.url, batch_id=args.batch, initial_limit=args.window) as window:
        gate = ConcurGate(graph, law=FixedLaw(args.window), window=window)
        tasks = [
            {"messages": [HumanMessage(f"{args.name} task {i} " + "context " * 10)]}
            for i in range(args.agents)
        ]
        results = await gate.abatch(tasks)
        complete = sum(
            1
            for i, r in enumerate(results)
            if isinstance(r, dict)
            and r["messages"][0].content.startswith(f"{args.name} task {i} ")
            and len(r["messages"]) == 2 * args.steps + 2
        )
        stats = gate.statistics()
        assert stats is not None
    sys.stdout.write(
        json.dumps(
            {
                "ev": "results",
                "n": len(results),
                "complete": complete,
                "parks": stats.gate.parks_total,
                "completed": stats.gate.completed,
            }
        )
        + "\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--sim", required=True)
    parser.add_argument("--model", default="test-tiny")
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tool-s", type=float, default=0.02)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--debug", action="store_true")
    parsed = parser.parse_args()
    if parsed.debug:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)d %(message)s")
        logging.getLogger("concur_langgraph").setLevel(logging.DEBUG)
    asyncio.run(main(parsed))

"""Way in 2: keep calling `graph.abatch` yourself and add the callback handler.

python examples/callback_handler.py --url http://127.0.0.1:8000 --model tiny
"""

from __future__ import annotations

import asyncio
import uuid

from _agent import build_graph, make_model, parse_args, tasks

from concur_langgraph import ConcurCallbackHandler


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    graph = build_graph(make_model(args.url, args.model))
    inputs = tasks(args.agents, args.steps)
    async with ConcurCallbackHandler(vllm_url=args.url) as handler:
        # One config per input, each with its own thread_id: the gate's agent identity (and,
        # with a checkpointer, the agent's thread).
        configs = [
            {"callbacks": [handler], "configurable": {"thread_id": str(uuid.uuid4())}}
            for _ in inputs
        ]
        results = await graph.abatch(inputs, config=configs, return_exceptions=True)
        stats = handler.statistics()
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{len(results) - len(failed)} agents finished, {len(failed)} failed")
    print(
        f"LLM calls gated: {stats.gate.llm_calls}, parks: {stats.gate.parks_total}, "
        f"final window: {stats.gate.window.limit}"
    )


if __name__ == "__main__":
    asyncio.run(main())

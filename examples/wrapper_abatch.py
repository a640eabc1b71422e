"""Way in 1: wrap the compiled graph and run the batch through the gate.

    python examples/wrapper_abatch.py --url http://127.0.0.1:8000 --model tiny

One line changes: `graph.abatch(tasks)` becomes `ConcurGate(graph, vllm_url=URL).abatch(tasks)`.
"""

from __future__ import annotations

import asyncio

from _agent import build_graph, make_model, parse_args, tasks

from concur_langgraph import ConcurGate


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    graph = build_graph(make_model(args.url, args.model))
    gate = ConcurGate(graph, vllm_url=args.url)
    results = await gate.abatch(tasks(args.agents, args.steps), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    stats = gate.statistics()
    assert stats is not None
    print(f"{len(results) - len(failed)} agents finished, {len(failed)} failed")
    print(
        f"LLM calls gated: {stats.gate.llm_calls}, parks: {stats.gate.parks_total}, "
        f"final window: {stats.gate.window.limit}"
    )


if __name__ == "__main__":
    asyncio.run(main())

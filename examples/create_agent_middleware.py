"""Way in 3: a langchain `create_agent` agent with the gate as middleware.

    python examples/create_agent_middleware.py --url http://127.0.0.1:8000 --model tiny

The middleware gates every model call of the agent's loop. Against the simulator started with
`concur sim serve --tool-call-turns 1-3` each agent calls the `lookup` tool one to three times
before it answers (seeded per agent); the random-weight test model of a real vLLM never calls
tools, so there each agent answers in one model call.
"""

from __future__ import annotations

import asyncio
import uuid

from _agent import make_model, parse_args
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from concur_langgraph import ConcurMiddleware


@tool
async def lookup(query: str) -> str:
    """Look something up (a stand-in tool with a latency)."""
    await asyncio.sleep(0.2)
    return f"nothing found for {query}"


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    middleware = ConcurMiddleware(vllm_url=args.url)
    agent = create_agent(make_model(args.url, args.model), [lookup], middleware=[middleware])
    inputs = [{"messages": [HumanMessage(f"question {i}")]} for i in range(args.agents)]
    configs = [{"configurable": {"thread_id": str(uuid.uuid4())}} for _ in inputs]
    async with middleware:
        results = await agent.abatch(inputs, config=configs, return_exceptions=True)
        stats = middleware.statistics()
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{len(results) - len(failed)} agents finished, {len(failed)} failed")
    print(f"LLM calls gated: {stats.gate.llm_calls}, final window: {stats.gate.window.limit}")


if __name__ == "__main__":
    asyncio.run(main())

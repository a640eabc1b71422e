"""Way in 4: a gate node in a hand-built graph, so agents park at a graph boundary.

    python examples/gate_node.py --url http://127.0.0.1:8000 --model tiny

The "admit" node runs before every LLM step in a super-step of its own: with a checkpointer, a
parked agent's state is saved exactly where it waits.
"""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

from _agent import make_model, parse_args
from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from concur_langgraph import ConcurGate, gate_node


class State(TypedDict):
    messages: Annotated[list[AnyMessage], operator.add]
    steps_left: int


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    model = make_model(args.url, args.model)

    async def llm(state: State) -> dict[str, Any]:
        return {
            "messages": [await model.ainvoke(state["messages"])],
            "steps_left": state["steps_left"] - 1,
        }

    async def tool(state: State) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"messages": [HumanMessage(content="Observation: " + "result " * 40)]}

    builder = StateGraph(State)
    builder.add_node("admit", gate_node())
    builder.add_node("llm", llm)
    builder.add_node("tool", tool)
    builder.add_edge(START, "admit")
    builder.add_edge("admit", "llm")
    builder.add_conditional_edges(
        "llm", lambda s: "tool" if s["steps_left"] > 0 else END, ["tool", END]
    )
    builder.add_edge("tool", "admit")
    graph = builder.compile(checkpointer=InMemorySaver())

    gate = ConcurGate(graph, vllm_url=args.url)
    inputs = [
        {"messages": [HumanMessage(f"task {i}")], "steps_left": args.steps}
        for i in range(args.agents)
    ]
    results = await gate.abatch(inputs, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{len(results) - len(failed)} agents finished, {len(failed)} failed")


if __name__ == "__main__":
    asyncio.run(main())

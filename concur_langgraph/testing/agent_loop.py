"""The smallest ReAct-shaped agent for tests and examples on a served model.

``observation_loop(model, steps=3, tool_s=0.5)``: ``agent`` (one LLM call) -> ``tool`` (a
timed observation, no LLM) -> ``agent`` ... for ``steps`` tool steps, then END. Its context grows
by an answer and an observation per step, as a real agent's does. ``loop_tasks(n)`` gives ``n``
inputs, each with its own task text so that agents share only what a real batch shares.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

__all__ = ["LoopState", "loop_tasks", "observation_loop"]


class LoopState(MessagesState):
    """The conversation plus the number of tool steps taken."""

    steps: int


def observation_loop(model: Any, *, steps: int = 3, tool_s: float = 0.5) -> Any:
    """agent -> tool -> agent ...: ``steps`` observations of ``tool_s`` seconds, then END."""

    async def agent(state: LoopState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def tool(state: LoopState) -> dict[str, Any]:
        await asyncio.sleep(tool_s)
        step = state.get("steps", 0) + 1
        return {"messages": [HumanMessage(f"observation {step}")], "steps": step}

    def route(state: LoopState) -> str:
        return "tool" if state.get("steps", 0) < steps else END

    builder = StateGraph(LoopState)
    builder.add_node("agent", agent)
    builder.add_node("tool", tool)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, {"tool": "tool", END: END})
    builder.add_edge("tool", "agent")
    return builder.compile()


def loop_tasks(count: int) -> list[dict[str, Any]]:
    """``count`` inputs: ``task i`` and a little context each."""
    return [{"messages": [HumanMessage(f"task {i} " + "context " * 20)]} for i in range(count)]

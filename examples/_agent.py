"""The agent the examples run: a ReAct-style LangGraph graph (LLM step, tool step, repeat).

Real agents stop when the model stops calling tools. The examples must also run against the
tiny random-weight model of the test tier and the simulator, whose answers are gibberish, so
this graph takes a fixed number of steps from its state instead of parsing tool calls; the
shape (LLM node -> tool node with a latency -> back to the LLM with a growing history) is what
matters for the KV cache.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], operator.add]
    steps_left: int


def make_model(url: str, model: str, max_tokens: int = 48, http_client: Any = None) -> ChatOpenAI:
    """ChatOpenAI for a vLLM server: exact output lengths, deliberate timeout and retries
    (``http_client``: the routing client, for several replicas)."""
    return ChatOpenAI(
        http_async_client=http_client,
        model=model,
        base_url=url.rstrip("/") + "/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=max_tokens,  # type: ignore[call-arg]
        extra_body={"ignore_eos": True},
        timeout=600,
        max_retries=2,
    )


def build_graph(model: ChatOpenAI, *, tool_latency_s: float = 0.2) -> Any:
    async def llm(state: AgentState) -> dict[str, Any]:
        reply = await model.ainvoke(state["messages"])
        return {"messages": [reply], "steps_left": state["steps_left"] - 1}

    async def search(state: AgentState) -> dict[str, Any]:
        await asyncio.sleep(tool_latency_s)  # the tool call: the agent keeps its slot
        # A text ReAct observation: the tiny model emits no structured tool calls to answer.
        return {"messages": [HumanMessage(content="Observation: " + "result " * 40)]}

    def route(state: AgentState) -> str:
        return "search" if state["steps_left"] > 0 else END

    builder = StateGraph(AgentState)
    builder.add_node("llm", llm)
    builder.add_node("search", search)
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, ["search", END])
    builder.add_edge("search", "llm")
    return builder.compile()


def tasks(n: int, steps: int) -> list[dict[str, Any]]:
    return [
        {"messages": [HumanMessage(f"task {i}: find the answer " * 8)], "steps_left": steps}
        for i in range(n)
    ]


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="vLLM base URL")
    parser.add_argument("--model", default="tiny", help="served model name")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    return parser.parse_args()

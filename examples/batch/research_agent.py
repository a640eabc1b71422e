"""The graph of docs/batch-cli.md: a small ReAct-style agent for ``concur run``.

    concur sim serve --preset test-tiny --port 8000 &      # or a real vLLM server
    VLLM_URL=http://127.0.0.1:8000 VLLM_MODEL=test-tiny \\
        concur run examples/batch/research_agent.py:make_graph examples/batch/tasks.jsonl \\
        --url http://127.0.0.1:8000 --out results.jsonl

``make_graph`` is a factory: ``concur run`` calls it once, so the model's URL and name are read
from the environment when the batch starts, not when the module is imported. Each task is
``{"messages": [...], "rounds": N}``: N LLM calls with a tool call between two of them.
The tool is a stand-in (a short sleep and a canned observation); the shape - LLM step, tool
with a latency, back to the LLM with a growing history - is what matters for the KV cache.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph


class AgentState(MessagesState):
    rounds: int


def make_graph() -> Any:
    url = os.environ.get("VLLM_URL", "http://127.0.0.1:8000")
    model = ChatOpenAI(
        model=os.environ.get("VLLM_MODEL", "test-tiny"),
        base_url=url.rstrip("/") + "/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=16,  # type: ignore[call-arg]
        extra_body={"ignore_eos": True},
        # Deliberate for batch work: a request may wait in a busy server's queue.
        timeout=600,
        max_retries=2,
    )

    async def llm(state: AgentState) -> dict[str, Any]:
        reply = await model.ainvoke(state["messages"])
        return {"messages": [reply], "rounds": state["rounds"] - 1}

    async def search(state: AgentState) -> dict[str, Any]:
        await asyncio.sleep(0.2)  # the tool call; the agent keeps its admission slot
        return {"messages": [HumanMessage("Observation: " + "result " * 20)]}

    def route(state: AgentState) -> str:
        return "search" if state["rounds"] > 0 else END

    builder = StateGraph(AgentState)
    builder.add_node("llm", llm)
    builder.add_node("search", search)
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, ["search", END])
    builder.add_edge("search", "llm")
    return builder.compile()

"""The gate's per-agent accounting is exact, through every way in.

Agents run against the simulator in virtual time (ChatOpenAI, the openai SDK, httpx on ASGI).
At each tool call the tool reads the gate's account of its own agent and compares it with what
the agent's messages say: the last answer's usage (prompt + completion tokens) is the agent's
context, the answers so far are its steps, their completion tokens what it generated; it holds
a slot and no call of it is in flight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import BaseTool, tool
from langgraph.config import get_config
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurGate,
    ConcurMiddleware,
    FixedLaw,
    Gate,
    gate_node,
    vtime,
)
from concur_langgraph.sim import SimServer, get_preset

AGENTS = 5


class Checks:
    """What the tools saw: one entry per tool call, and the gate they read."""

    def __init__(self) -> None:
        self.gate: Gate | None = None
        self.seen: list[tuple[Any, dict[str, int]]] = []


def _expected(messages: list[Any]) -> dict[str, int]:
    answers = [m for m in messages if isinstance(m, AIMessage)]
    usage = answers[-1].usage_metadata
    assert usage is not None
    return {
        "context": usage["input_tokens"] + usage["output_tokens"],
        "steps": len(answers),
        "generated": sum(a.usage_metadata["output_tokens"] for a in answers),  # type: ignore[index]
    }


def _lookup_tool(checks: Checks) -> BaseTool:
    @tool
    async def lookup(query: str) -> str:
        """Look something up."""
        assert checks.gate is not None
        config = get_config()
        agent_id = str(config["configurable"]["thread_id"])
        [account] = [a for a in checks.gate.accounting() if a.agent_id == agent_id]
        checks.seen.append((account, {}))
        return f"nothing about {query}"

    return lookup


def _server() -> SimServer:
    return SimServer(dataclasses.replace(get_preset("test-tiny"), tool_call_turns=(1, 3)))


def _react(model: Any, tools: list[BaseTool], *, node: bool) -> Any:
    bound = model.bind_tools(tools)

    async def llm(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("llm", llm)
    builder.add_node("tools", ToolNode(tools))
    entry = "llm"
    if node:
        builder.add_node("admit", gate_node())
        builder.add_edge("admit", "llm")
        entry = "admit"
    builder.add_edge(START, entry)
    builder.add_conditional_edges("llm", tools_condition)
    builder.add_edge("tools", entry)
    return builder.compile()


def _inputs() -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"question {i}: what is new?")]} for i in range(AGENTS)]


def _configs() -> list[dict[str, Any]]:
    return [{"configurable": {"thread_id": f"agent-{i}"}} for i in range(AGENTS)]


async def _via_gate(checks: Checks, node: bool) -> tuple[list[Any], Any]:
    async with _server() as server:
        model = server.chat_model(max_tokens=8)
        gate = ConcurGate(_react(model, [_lookup_tool(checks)], node=node), law=FixedLaw(2))
        async with gate:
            assert gate.session is not None
            checks.gate = gate.session.gate
            results = await gate.abatch(_inputs(), _configs())  # type: ignore[arg-type]
        return results, gate.statistics()


async def _via_handler(checks: Checks, node: bool) -> tuple[list[Any], Any]:
    async with _server() as server:
        model = server.chat_model(max_tokens=8)
        graph = _react(model, [_lookup_tool(checks)], node=False)
        async with ConcurCallbackHandler(law=FixedLaw(2)) as handler:
            checks.gate = handler.session.gate
            configs = [{**c, "callbacks": [handler]} for c in _configs()]
            results = await graph.abatch(_inputs(), configs)
        return results, handler.statistics()


async def _via_middleware(checks: Checks, node: bool) -> tuple[list[Any], Any]:
    async with _server() as server:
        model = server.chat_model(max_tokens=8)
        middleware = ConcurMiddleware(law=FixedLaw(2))
        agent = create_agent(model, [_lookup_tool(checks)], middleware=[middleware])
        async with middleware:
            checks.gate = middleware.session.gate
            results = await agent.abatch(_inputs(), _configs())  # type: ignore[arg-type]
        return results, middleware.statistics()


WAYS: dict[str, Callable[[Checks, bool], Awaitable[tuple[list[Any], Any]]]] = {
    "concur-gate": _via_gate,
    "callback-handler": _via_handler,
    "middleware": _via_middleware,
}


@pytest.mark.parametrize(
    ("way", "node"),
    [
        ("concur-gate", False),
        ("concur-gate", True),
        ("callback-handler", False),
        ("middleware", False),
    ],
)
def test_each_agents_account_matches_its_messages(way: str, node: bool) -> None:
    checks = Checks()
    results, stats = vtime.run(WAYS[way](checks, node))
    by_agent = {f"agent-{i}": r["messages"] for i, r in enumerate(results)}
    assert len(checks.seen) >= AGENTS  # every agent called its tool at least once
    for account, _ in checks.seen:
        assert (account.state, account.in_call) == ("active", False)
        messages = by_agent[account.agent_id]
        # The tool ran after answer number `steps`: compare with the messages up to it.
        answers = [i for i, m in enumerate(messages) if isinstance(m, AIMessage)]
        upto = messages[: answers[account.steps - 1] + 1]
        assert {
            "context": account.context,
            "steps": account.steps,
            "generated": account.generated,
        } == _expected(upto), account
        first = next(m for m in messages if isinstance(m, AIMessage)).usage_metadata
        assert account.first_context == first["input_tokens"] + first["output_tokens"]  # type: ignore[index]
    generated = sum(
        m.usage_metadata["output_tokens"]  # type: ignore[index]
        for r in results
        for m in r["messages"]
        if isinstance(m, AIMessage)
    )
    assert (stats.gate.tokens_generated, stats.gate.usage_missing) == (generated, 0)
    assert (stats.gate.tokens_active, stats.gate.in_call, stats.gate.active) == (0, 0, 0)

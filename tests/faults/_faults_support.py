"""Agents on the simulator for the fault tests: a graph, tasks, a law that records what it saw,
and a watcher of the controller.

The graph is a ReAct-shaped loop with a real ``ChatOpenAI`` on the simulator: ``agent`` (one
LLM call) -> ``tool`` (a timed observation) -> ``agent`` ... for ``STEPS`` tool steps, then END.
Each task says how its agent behaves in the tool (``"ok"``, ``"raise"``, ``"loop"`` forever,
``"interrupt"`` for a human's approval), so one batch can mix every ending.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import interrupt

from concur_langgraph import Sample
from concur_langgraph.sim import SimServer
from concur_langgraph.sim._faults import TimeoutASGITransport

STEPS = 3
TOOL_S = 1.0


class ToolFailure(RuntimeError):
    """What a ``"raise"`` agent's tool raises."""


class AgentState(MessagesState):
    steps: int
    behaviour: str


def agent_graph(model: Any, *, checkpointer: Any = None) -> Any:
    """agent -> tool -> agent ... (STEPS tool steps) -> END; the tool follows ``behaviour``."""

    async def agent(state: AgentState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def tool(state: AgentState) -> dict[str, Any]:
        await asyncio.sleep(TOOL_S)
        step = state.get("steps", 0) + 1
        behaviour = state.get("behaviour", "ok")
        if behaviour == "raise" and step == 2:
            raise ToolFailure(f"tool failed at step {step}")
        if behaviour == "interrupt" and step == 1:
            answer = interrupt("approve?")
            return {"messages": [HumanMessage(f"approved: {answer}")], "steps": step}
        return {"messages": [HumanMessage(f"observation {step}")], "steps": step}

    def route(state: AgentState) -> str:
        if state.get("behaviour") == "loop":
            return "tool"
        return "tool" if state.get("steps", 0) < STEPS else END

    builder = StateGraph(AgentState)
    builder.add_node("agent", agent)
    builder.add_node("tool", tool)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, {"tool": "tool", END: END})
    builder.add_edge("tool", "agent")
    return builder.compile(checkpointer=checkpointer or InMemorySaver())


def tasks(behaviours: list[str]) -> list[dict[str, Any]]:
    return [
        {"messages": [HumanMessage(f"task {i} " + "context " * 20)], "behaviour": b}
        for i, b in enumerate(behaviours)
    ]


def finished_ok(result: Any) -> bool:
    """A run that went through all its steps and ended with the model's answer."""
    return (
        isinstance(result, dict)
        and result.get("steps") == STEPS
        and len(result["messages"]) == 2 * STEPS + 2
    )


def chat_model(server: SimServer, **kwargs: Any) -> Any:
    """``ChatOpenAI`` on the simulator through a transport that enforces the read timeout."""
    client = httpx.AsyncClient(transport=TimeoutASGITransport(server.app))
    return server.chat_model(max_tokens=8, http_async_client=client, **kwargs)


@dataclass
class RampLaw:
    """Grows the window by one on every sample it is given; records those samples.

    The controller calls a law only with good samples, so ``samples`` is what the batch's
    window decisions were based on. Growth regardless of the cache makes "the window moves"
    an unambiguous sign that the controller is acting on data.
    """

    samples: list[Sample] = field(default_factory=list)
    follows_demand: bool = False

    def next_window(self, window: int, sample: Sample) -> int:
        self.samples.append(sample)
        return window + 1


@dataclass
class Observation:
    time: float
    window: int
    stale: bool
    errors: int


async def watch(gate: Any, into: list[Observation], every_s: float = 0.1) -> None:
    """Record the controller's window and staleness every ``every_s`` until cancelled."""
    while True:
        stats = gate.statistics()
        if stats is not None and stats.controller is not None:
            c = stats.controller
            now = asyncio.get_running_loop().time()
            into.append(Observation(now, c.window, c.stale, c.errors))
        await asyncio.sleep(every_s)

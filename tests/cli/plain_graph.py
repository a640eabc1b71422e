"""A graph without an LLM for the in-process ``concur run`` tests (run with ``--law static:K``).

``{"n": N}`` counts to N in N steps; ``"fail": true`` raises in the first step;
``"ask": true`` stops at a human-in-the-loop ``interrupt()``.
"""

from __future__ import annotations

from typing import Any, NotRequired

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt
from typing_extensions import TypedDict


class State(TypedDict):
    n: int
    count: NotRequired[int]
    fail: NotRequired[bool]
    ask: NotRequired[bool]
    answer: NotRequired[str]


class TaskFailed(RuntimeError):
    pass


async def step(state: State) -> dict[str, Any]:
    if state.get("fail"):
        raise TaskFailed(f"task with n={state['n']} failed on purpose")
    if state.get("ask") and "answer" not in state:
        return {"answer": interrupt("approve?")}
    return {"count": state.get("count", 0) + 1}


def _route(state: State) -> str:
    return "step" if state.get("count", 0) < state["n"] else END


builder = StateGraph(State)
builder.add_node("step", step)
builder.add_edge(START, "step")
builder.add_conditional_edges("step", _route, ["step", END])
graph = builder.compile()

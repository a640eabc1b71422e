"""The graph the ``concur run`` tests run: think (an LLM call) / tool (a sleep), ``rounds`` times.

Every node execution appends ``{"thread", "node", "step", "pid"}`` to the file named by
``CONCUR_TEST_STEP_LOG`` (one ``os.write`` on an ``O_APPEND`` file, so concurrent writers and
a SIGKILL leave whole lines), so a test can tell which process ran which step of which agent.
``step`` is the state's step counter when the node starts: think at 0, 2, ..., 2*rounds, tool
in between; a run that resumes from a checkpoint starts at the step after the last saved one.

The LLM is ``ChatOpenAI`` on ``CONCUR_TEST_LLM_URL`` (the simulator the test starts), the real
client stack, with 4-token answers.

A task with ``hold_at: N`` waits in its tool node at step ``N`` until the file named by
``CONCUR_TEST_RELEASE`` exists: the tests stop the batch while such agents are mid-run, with
no timing involved.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
from typing import Annotated, Any, NotRequired, TypedDict

from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph


class State(TypedDict):
    topic: str
    rounds: int
    tool_s: NotRequired[float]
    hold_at: NotRequired[int]
    step: NotRequired[int]
    notes: Annotated[NotRequired[list[str]], operator.add]


def _log(config: RunnableConfig, node: str, step: int) -> None:
    path = os.environ.get("CONCUR_TEST_STEP_LOG")
    if not path:
        return
    entry = {
        "thread": config["configurable"]["thread_id"],
        "node": node,
        "step": step,
        "pid": os.getpid(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def _model() -> ChatOpenAI:
    url = os.environ.get("CONCUR_TEST_LLM_URL", "http://127.0.0.1:9")
    return ChatOpenAI(
        model="test-tiny",
        base_url=url.rstrip("/") + "/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=4,  # type: ignore[call-arg]
        extra_body={"ignore_eos": True},
        timeout=60,
        max_retries=2,
    )


async def think(state: State, config: RunnableConfig) -> dict[str, Any]:
    step = state.get("step", 0)
    _log(config, "think", step)
    reply = await _model().ainvoke([HumanMessage(f"{state['topic']} step {step}")])
    return {"step": step + 1, "notes": [str(reply.content)]}


async def tool(state: State, config: RunnableConfig) -> dict[str, Any]:
    step = state.get("step", 0)
    _log(config, "tool", step)
    await asyncio.sleep(state.get("tool_s", 0.0))
    if state.get("hold_at") == step:
        release = os.environ.get("CONCUR_TEST_RELEASE", "")
        # The release comes from the test process: a file is the signal both can see.
        while not os.path.exists(release):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)
    return {"step": step + 1}


def _route(state: State) -> str:
    return "tool" if state.get("step", 0) < 2 * state["rounds"] else END


def build() -> Any:
    builder = StateGraph(State)
    builder.add_node("think", think)
    builder.add_node("tool", tool)
    builder.add_edge(START, "think")
    builder.add_conditional_edges("think", _route, ["tool", END])
    builder.add_edge("tool", "think")
    return builder.compile()


graph = build()


async def async_factory() -> Any:
    return build()


def needs_args(model: str) -> Any:
    return build()


not_a_graph = {"a": 1}

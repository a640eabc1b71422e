"""The graph the crash-at-every-write tests of ``concur run`` run: no server, a scripted model.

think (a chat-model call, so the gate admits and parks it) / tool, ``rounds`` times, like
``step_graph.py``; every node execution appends ``{"thread", "node", "step", "pid"}`` to the
file named by ``CONCUR_TEST_STEP_LOG`` (one ``O_APPEND`` write, whole lines under SIGKILL).
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
from typing import Annotated, Any, NotRequired, TypedDict

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph


class State(TypedDict):
    topic: str
    rounds: int
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


class EchoModel(BaseChatModel):
    """Answers ``done: <the question>`` after yielding to the loop once."""

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("async only")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(0)
        answer = AIMessage(content=f"done: {messages[-1].content}")
        return ChatResult(generations=[ChatGeneration(message=answer)])


_MODEL = EchoModel()


async def think(state: State, config: RunnableConfig) -> dict[str, Any]:
    step = state.get("step", 0)
    _log(config, "think", step)
    reply = await _MODEL.ainvoke([HumanMessage(f"{state['topic']} step {step}")])
    return {"step": step + 1, "notes": [str(reply.content)]}


async def tool(state: State, config: RunnableConfig) -> dict[str, Any]:
    step = state.get("step", 0)
    _log(config, "tool", step)
    await asyncio.sleep(0)
    return {"step": step + 1}


def _route(state: State) -> str:
    return "tool" if state.get("step", 0) < 2 * state["rounds"] else END


builder = StateGraph(State)
builder.add_node("think", think)
builder.add_node("tool", tool)
builder.add_edge(START, "think")
builder.add_conditional_edges("think", _route, ["tool", END])
builder.add_edge("tool", "think")
graph = builder.compile()

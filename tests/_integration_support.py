"""Real LangGraph graphs and a scripted chat model that watches concurrency from the model side.

Every agent is named by its first human message (``agent-3``). The model answers each call
from the conversation it is given: while fewer than ``steps`` tool results are in it, it asks
for one more tool call, then it gives the final answer. Generation and tools take virtual time
(``asyncio.sleep`` under :func:`concur_langgraph.vtime.run`), so runs interleave exactly the
same way on every machine.

The :class:`Tracker` records, from the model's side:

* ``active``: agents between their first call and their final answer, i.e. agents that must
  hold a slot. Its maximum over the batch is what a fixed window must bound;
* every call's input messages per agent, to check that an agent that parked continues exactly
  where it stopped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import ConfigDict


class AgentFailure(RuntimeError):
    """Raised by the tool for agents listed as failing."""


class Tracker:
    """What the model saw: concurrency and each agent's conversation at each call."""

    def __init__(self, holders: Callable[[], int] | None = None) -> None:
        self.active: set[str] = set()
        self.max_active = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: dict[str, list[list[BaseMessage]]] = {}
        self.finished: list[str] = []
        self.call_times: list[float] = []
        self.max_holders = 0
        self._holders = holders

    def watch_holders(self, holders: Callable[[], int]) -> None:
        self._holders = holders

    def call_started(self, agent: str, messages: Sequence[BaseMessage]) -> None:
        self.calls.setdefault(agent, []).append(list(messages))
        try:
            self.call_times.append(asyncio.get_running_loop().time())
        except RuntimeError:  # a sync model call on a worker thread: no loop, no clock
            pass
        self.active.add(agent)
        self.max_active = max(self.max_active, len(self.active))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self._holders is not None:
            self.max_holders = max(self.max_holders, self._holders())

    def call_ended(self, agent: str, *, final: bool) -> None:
        self.in_flight -= 1
        if final:
            self.active.discard(agent)
            self.finished.append(agent)

    def agent_failed(self, agent: str) -> None:
        self.active.discard(agent)


def agent_name(messages: Sequence[BaseMessage]) -> str:
    for message in messages:
        if isinstance(message, HumanMessage):
            return str(message.content)
    raise AssertionError(f"no human message in {messages!r}")


class ScriptedChatModel(BaseChatModel):
    """A chat model whose answers follow the conversation (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tracker: Any
    steps: int = 3
    gen_s: float = 1.0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _answer(self, messages: list[BaseMessage]) -> tuple[AIMessage, bool]:
        agent = agent_name(messages)
        done = sum(isinstance(m, ToolMessage) for m in messages)
        if done < self.steps:
            step = done + 1
            call = {"name": "work", "args": {"step": step}, "id": f"{agent}|{step}"}
            return AIMessage(content="", tool_calls=[call]), False
        return AIMessage(content=f"{agent} finished after {done} steps"), True

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        agent = agent_name(messages)
        self.tracker.call_started(agent, messages)
        final = False
        try:
            await asyncio.sleep(self.gen_s)
            message, final = self._answer(messages)
        finally:
            self.tracker.call_ended(agent, final=final)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        agent = agent_name(messages)
        self.tracker.call_started(agent, messages)
        message, final = self._answer(messages)
        self.tracker.call_ended(agent, final=final)
        return ChatResult(generations=[ChatGeneration(message=message)])


def work_tool(
    tracker: Tracker, *, latency_s: float = 3.0, failing: frozenset[str] = frozenset()
) -> BaseTool:
    """The agents' one tool: waits ``latency_s`` (virtual), fails for ``failing`` agents."""

    @tool
    async def work(step: int, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        """Do one step of work."""
        agent = tool_call_id.split("|")[0]
        await asyncio.sleep(latency_s)
        if agent in failing:
            tracker.agent_failed(agent)
            raise AgentFailure(f"{agent} failed at step {step}")
        return f"result of step {step} for {agent}"

    return work


def tool_loop_graph(
    model: BaseChatModel,
    tools: list[BaseTool],
    *,
    admit: Any = None,
    checkpointer: Any = None,
    sync_model_call: bool = False,
) -> Any:
    """A hand-built ReAct loop: (admit ->) agent -> tools -> (admit ->) agent ... -> END."""
    builder = StateGraph(MessagesState)
    if sync_model_call:

        def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [model.invoke(state["messages"])]}

        builder.add_node("agent", agent)
    else:

        async def agent_async(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await model.ainvoke(state["messages"])]}

        builder.add_node("agent", agent_async)
    builder.add_node("tools", ToolNode(tools))
    entry = "agent"
    if admit is not None:
        builder.add_node("admit", admit)
        builder.add_edge("admit", "agent")
        entry = "admit"
    builder.add_edge(START, entry)
    builder.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    builder.add_edge("tools", entry)
    return builder.compile(checkpointer=checkpointer)


def graph_with_subgraph(inner: Any) -> Any:
    """A parent graph whose only node is ``inner`` (a compiled graph): LLM calls happen one
    level down."""
    builder = StateGraph(MessagesState)
    builder.add_node("inner", inner)
    builder.add_edge(START, "inner")
    builder.add_edge("inner", END)
    return builder.compile()


def inputs(count: int) -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"agent-{i}")]} for i in range(count)]


def assert_continuous(tracker: Tracker, result: dict[str, Any], steps: int) -> None:
    """The agent's conversation grew by exactly (its answer, the tool result) between two of
    its calls, and the final state is the last call's input plus the final answer."""
    messages: list[BaseMessage] = result["messages"]
    agent = agent_name(messages)
    calls = tracker.calls[agent]
    assert len(calls) == steps + 1, f"{agent}: {len(calls)} calls"
    for before, after in itertools.pairwise(calls):
        assert len(after) == len(before) + 2
        assert [m.content for m in after[: len(before)]] == [m.content for m in before]
        assert isinstance(after[-2], AIMessage) and isinstance(after[-1], ToolMessage)
        assert after[-1].tool_call_id == after[-2].tool_calls[0]["id"]
    assert [m.content for m in messages[:-1]] == [m.content for m in calls[-1]]
    assert messages[-1].content == f"{agent} finished after {steps} steps"
    tool_results = [m.content for m in messages if isinstance(m, ToolMessage)]
    assert tool_results == [f"result of step {s} for {agent}" for s in range(1, steps + 1)]

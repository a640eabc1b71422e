"""The benchmark's agents: real LangGraph ReAct graphs whose sizes follow an :class:`AgentPlan`.

Each agent is a ``StateGraph`` with an LLM node (``ChatOpenAI`` bound to a ``search`` tool), a
tool node and a conditional edge between them, the shape of every hand-written ReAct agent::

    START -> llm --(more steps?)--> tools -> llm -> ... -> llm --(done)--> END

The LLM node asks for exactly the step's output tokens (``max_tokens`` = ``min_tokens`` = n
and ``ignore_eos``, vLLM's extras, sent in the body), so a step generates n tokens on any
vLLM-compatible server. The tool node sleeps the drawn latency (a real ``asyncio.sleep``: the
event loop's clock, virtual under virtual time) and returns an observation of the drawn number
of words: the simulator's tokenizer counts one token per whitespace-separated word.

Words are drawn from a small list of common English words, per agent and per message, so two
agents share the system prompt (and the tool schemas) as a cached prefix but never their own
task or observations (a 16-token block of 34 possible words repeats with probability 34^-16);
a real tokenizer turns these words into one token each too (see ``_WORDS``).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Annotated, Any, Final, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from concur_langgraph.bench._workload import AgentPlan, Workload

__all__ = [
    "AgentState",
    "AgentTracker",
    "agent_input",
    "build_agent_graph",
    "recursion_limit",
    "system_prompt",
    "words",
]

# Common English words that are one token each for the tokenizer of the real-vLLM test model
# (the tiny BPE of testing/make_tiny_model.py, checked: 1.00 token per word over 2000 draws)
# and for the usual large BPE vocabularies, so a workload's sizes hold on a real server too.
_WORDS: Final = (
    "about an and assistant block cache data explain for hello how in is me memory model "
    "number of on please prefix queue request server story tell the to token user what why "
    "with world"
).split()


def words(rng: random.Random, count: int) -> str:
    """``count`` space-separated words drawn from a fixed list (``count`` simulator tokens)."""
    return " ".join(rng.choices(_WORDS, k=count))


@tool
def search(query: str) -> str:
    """Search the project's knowledge base and return the matching passages."""
    # Never called: the tool node below simulates it (see build_agent_graph). It exists so the
    # model is bound to a real tool schema, which the server renders into every prompt.
    raise NotImplementedError("simulated by the benchmark's tool node")


class AgentState(TypedDict):
    """Graph state of one benchmark agent."""

    messages: Annotated[list[AnyMessage], add_messages]
    """The conversation: system, task, then (assistant, tool) pairs."""
    plan: AgentPlan
    """What this agent does (sizes of every step)."""
    step: int
    """LLM calls completed so far."""


@dataclass(slots=True)
class AgentTracker:
    """Counts what the agents of one run did, as seen from inside their graphs."""

    started: int = 0
    """Agents that made their first LLM call."""
    finished: int = 0
    """Agents whose last LLM call returned."""
    failed: int = 0
    """Agents whose LLM call raised (an HTTP error, a timeout): they end there."""
    llm_calls: int = 0
    """LLM calls that returned."""
    generated_tokens: int = 0
    """Output tokens the server reported (``usage.completion_tokens``), summed."""
    prompt_tokens: int = 0
    """Prompt tokens the server reported, summed over calls."""
    cached_tokens: int = 0
    """Prompt tokens the server reported as served from its prefix cache, summed."""
    short_replies: int = 0
    """Calls whose reply had fewer tokens than asked (should stay 0)."""

    @property
    def active(self) -> int:
        """Agents started that neither finished nor failed."""
        return self.started - self.finished - self.failed


def _usage(message: AIMessage) -> tuple[int, int, int]:
    usage = message.usage_metadata
    if usage is None:
        return 0, 0, 0
    details = usage.get("input_token_details") or {}
    return (
        int(usage.get("output_tokens", 0)),
        int(usage.get("input_tokens", 0)),
        int(details.get("cache_read", 0) or 0),
    )


def build_agent_graph(model: BaseChatModel, tracker: AgentTracker | None = None) -> Any:
    """A compiled ReAct graph on ``model`` whose every step follows the agent's plan.

    ``tracker`` (optional) is updated by the nodes: agents started / finished, calls, tokens.
    """
    # The server is a benchmark engine (the simulator, or vLLM with a random-weight model): its
    # text is not a real tool call, and parsing it would make the loop length a matter of luck.
    # So the LLM node *declares* the step's tool call itself (a well-formed tool_calls entry,
    # as a model that called the tool would have produced, and which is sent back in the next
    # request), and the loop is driven by the step count in the graph state, not by parsing.
    # tool_choice="none" keeps the tool schemas in every prompt (as in a real agent) while
    # telling vLLM not to expect or parse tool calls (vLLM refuses "auto" unless it was started
    # with --enable-auto-tool-choice and a parser).
    bound = model.bind_tools([search], tool_choice="none")
    track = tracker if tracker is not None else AgentTracker()

    async def llm(state: AgentState) -> dict[str, Any]:
        plan = state["plan"]
        step = state["step"]
        n = plan.output_tokens[step]
        if step == 0:
            track.started += 1
        try:
            reply = await bound.ainvoke(
                state["messages"],
                max_tokens=n,
                extra_body={"ignore_eos": True, "min_tokens": n},
            )
        except BaseException:
            # The error ends the agent (abatch returns it); it is no longer active.
            track.failed += 1
            raise
        if not isinstance(reply, AIMessage):  # pragma: no cover - ChatOpenAI returns AIMessage
            raise TypeError(f"expected an AIMessage, got {type(reply).__name__}")
        out, prompt, cached = _usage(reply)
        track.llm_calls += 1
        track.generated_tokens += out
        track.prompt_tokens += prompt
        track.cached_tokens += cached
        if out < n:
            track.short_replies += 1
        last = step + 1 == plan.steps
        if last:
            track.finished += 1
            message = reply
        else:
            message = AIMessage(
                content=reply.content,
                id=reply.id,
                response_metadata=reply.response_metadata,
                usage_metadata=reply.usage_metadata,
                tool_calls=[
                    {
                        "name": "search",
                        "args": {"query": f"agent {plan.index} step {step}"},
                        "id": f"call-{plan.index}-{step}",
                        "type": "tool_call",
                    }
                ],
            )
        return {"messages": [message], "step": step + 1}

    async def tools(state: AgentState) -> dict[str, Any]:
        plan = state["plan"]
        done = state["step"]  # the tool call of LLM step `done - 1`
        await asyncio.sleep(plan.tool_latency_s[done - 1])
        rng = random.Random(f"obs:{plan.index}:{done}")
        observation = words(rng, plan.observation_tokens[done - 1])
        return {
            "messages": [
                ToolMessage(content=observation, tool_call_id=f"call-{plan.index}-{done - 1}")
            ]
        }

    # async on purpose: LangGraph runs a sync edge function in a worker thread, a thread hop
    # per step that costs real time for nothing.
    async def route(state: AgentState) -> str:
        return "tools" if state["step"] < state["plan"].steps else END

    builder = StateGraph(AgentState)
    builder.add_node("llm", llm)
    builder.add_node("tools", tools)
    builder.add_edge(START, "llm")
    builder.add_conditional_edges("llm", route, ["tools", END])
    builder.add_edge("tools", "llm")
    return builder.compile()


def system_prompt(workload: Workload) -> str:
    """The system prompt shared by every agent of ``workload``."""
    return words(random.Random(f"system:{workload.seed}"), workload.system_prompt_tokens)


def agent_input(workload: Workload, plan: AgentPlan, *, system: str | None = None) -> AgentState:
    """The graph input of one agent: system prompt, its task, its plan, step 0."""
    rng = random.Random(f"task:{workload.seed}:{plan.index}")
    return AgentState(
        messages=[
            SystemMessage(content=system if system is not None else system_prompt(workload)),
            HumanMessage(content=words(rng, plan.task_prompt_tokens)),
        ],
        plan=plan,
        step=0,
    )


def recursion_limit(plan: AgentPlan) -> int:
    """LangGraph's super-step limit for this plan (two nodes per step, plus slack)."""
    return 2 * plan.steps + 5

"""A durable batch stopped at every checkpoint write, then run again: nothing is lost or doubled.

The first run goes through a :class:`StoppingSaver` that stops the batch right after its Nth
write to the checkpoint store, for every N from the first write to the last one the batch
makes. Three ways of stopping:

* ``kill``: the process dies (SIGKILL, power loss): nothing after write N reaches the store;
* ``cancel``: the batch task is cancelled (what ``asyncio.run`` does on Ctrl-C); LangGraph
  unwinds and may still write;
* ``drain-cancel``: a double Ctrl-C: ``request_drain`` at write N, cancel at write N + 1.

Then the same ``abatch(..., batch_id=...)`` runs again on the store. What must hold, for every
N, saver (in-memory, SQLite) and durability mode (``sync``, ``async``, ``exit``):

* every result is a finished agent: its whole conversation, each step exactly once, in order;
* the second run does exactly the work the store did not hold: an agent whose store held k of
  its model answers and j of its tool results makes ``STEPS + 1 - k`` model calls and runs
  ``WIDTH * STEPS - j`` tools. A finished step never runs again, an unfinished one always does;
* a result the first run gave before it stopped is a finished agent whose store says so.

Two graphs: a ReAct loop (model -> ``ToolNode`` -> model) and a fan-out (model -> one ``Send``
per tool call, run as parallel tasks of one super-step), so steps with several tasks, some of
them saved and some not, are covered too. Everything runs in virtual time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from _crash_support import ProcessDied, StoppingSaver, run_in_child
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode
from langgraph.types import Send
from pydantic import ConfigDict
from typing_extensions import TypedDict

from concur_langgraph import AgentDrainedError, ConcurGate, FixedLaw, vtime

AGENTS = 3
STEPS = 2
WIDTH = 2  # tool calls per model answer
WINDOW = 2  # smaller than the batch: the third agent waits for a slot

Stop = Literal["kill", "sigkill", "cancel", "drain-cancel"]
Durability = Literal["sync", "async", "exit"]


class Work:
    """What ran, per agent: model calls and tool executions, counted as they start."""

    def __init__(self) -> None:
        self.model: collections.Counter[str] = collections.Counter()
        self.tools: collections.Counter[str] = collections.Counter()


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _agent(messages: list[BaseMessage]) -> str:
    return str(next(m.content for m in messages if isinstance(m, HumanMessage)))


class FanModel(BaseChatModel):
    """Answers with WIDTH tool calls per step until STEPS steps have their results."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    work: Any

    @property
    def _llm_type(self) -> str:
        return "fan"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("async only")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        agent = _agent(messages)
        self.work.model[agent] += 1
        await asyncio.sleep(1.0)
        done = sum(isinstance(m, ToolMessage) for m in messages)
        if done < WIDTH * STEPS:
            step = done // WIDTH + 1
            calls = [
                {"name": "work", "args": {"step": step, "k": k}, "id": f"{agent}|{step}|{k}"}
                for k in range(WIDTH)
            ]
            message = AIMessage(content="", tool_calls=calls)
        else:
            message = AIMessage(content=f"{agent} finished after {STEPS} steps")
        return ChatResult(generations=[ChatGeneration(message=message)])


def _work_tool(work: Work) -> BaseTool:
    @tool
    async def work_step(step: int, k: int, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        """One unit of work."""
        agent = tool_call_id.split("|")[0]
        work.tools[agent] += 1
        await asyncio.sleep(2.0 + k)
        return f"{agent} step {step} part {k}"

    work_step.name = "work"
    return work_step


def react_graph(work: Work) -> Any:
    model, tools = FanModel(work=work), [_work_tool(work)]

    async def think(state: State) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def route(state: State) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    builder = StateGraph(State)
    builder.add_node("think", think)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "think")
    builder.add_conditional_edges("think", route, ["tools", END])
    builder.add_edge("tools", "think")
    return builder.compile()


def fanout_graph(work: Work) -> Any:
    model, (work_step,) = FanModel(work=work), [_work_tool(work)]

    async def think(state: State) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def one_call(call: dict[str, Any]) -> dict[str, Any]:
        result = await work_step.ainvoke({**call, "type": "tool_call"})
        return {"messages": [result]}

    def fan(state: State) -> Any:
        last = state["messages"][-1]
        if isinstance(last, AIMessage) and last.tool_calls:
            return [Send("one_call", call) for call in last.tool_calls]
        return END

    builder = StateGraph(State)
    builder.add_node("think", think)
    builder.add_node("one_call", one_call)
    builder.add_edge(START, "think")
    builder.add_conditional_edges("think", fan, ["one_call", END])
    builder.add_edge("one_call", "think")
    return builder.compile()


GRAPHS: dict[str, Callable[[Work], Any]] = {"react": react_graph, "fanout": fanout_graph}


def _tasks() -> list[dict[str, Any]]:
    return [{"messages": [HumanMessage(f"agent-{i}")]} for i in range(AGENTS)]


def assert_finished(agent: str, output: Any) -> None:
    """The whole conversation: each step's calls and results exactly once, in order."""
    messages = output["messages"]
    assert [type(m) for m in messages] == [
        HumanMessage,
        *([AIMessage, *[ToolMessage] * WIDTH] * STEPS),
        AIMessage,
    ], f"{agent}: {[m.content for m in messages]}"
    for step in range(1, STEPS + 1):
        start = 1 + (step - 1) * (WIDTH + 1)
        results = {m.content for m in messages[start + 1 : start + 1 + WIDTH]}
        assert results == {f"{agent} step {step} part {k}" for k in range(WIDTH)}
    assert messages[-1].content == f"{agent} finished after {STEPS} steps"


# -- savers -----------------------------------------------------------------------------------


@asynccontextmanager
async def _memory(store: dict[str, Any]) -> Any:
    yield store.setdefault("saver", InMemorySaver())


@asynccontextmanager
async def _sqlite(store: dict[str, Any]) -> Any:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    # A new connection per run, as a restarted process opens the file again.
    async with AsyncSqliteSaver.from_conn_string(str(store["path"])) as saver:
        yield saver


SAVERS = {"memory": _memory, "sqlite": _sqlite}


# -- one stop and one resume -----------------------------------------------------------------


def _first_run(
    graph: Any,
    open_disk: Any,
    store: dict[str, Any],
    *,
    after: int | None,
    stop: Stop,
    durability: Durability,
    given_log: Path | None = None,
) -> tuple[int, bool, list[tuple[int, Any]]]:
    """The first run, stopped at write ``after`` (``None``: never): (writes, stopped, the
    results it gave). ``given_log`` gets the index of each result as it is given (one
    ``O_APPEND`` write each, so a SIGKILL leaves whole lines)."""

    async def main() -> tuple[int, bool, list[tuple[int, Any]]]:
        batch = asyncio.current_task()
        assert batch is not None
        given: list[tuple[int, Any]] = []
        async with open_disk(store) as disk:
            hooks: dict[int, Callable[[], None]] = {}
            if after is not None:
                if stop == "sigkill":
                    hooks[after] = lambda: os.kill(os.getpid(), signal.SIGKILL)
                elif stop == "drain-cancel":  # Ctrl-C, then Ctrl-C again at the next write
                    hooks[after] = lambda: gate.request_drain("ctrl-c")
                    hooks[after + 1] = batch.cancel
                else:
                    hooks[after] = batch.cancel
            saver = StoppingSaver(disk, hooks=hooks, die_after=after if stop == "kill" else None)
            gate = ConcurGate(graph, law=FixedLaw(WINDOW), checkpointer=saver)
            try:
                async for index, out in gate.abatch_as_completed(
                    _tasks(), batch_id="b", return_exceptions=True, durability=durability
                ):
                    given.append((index, out))
                    if given_log is not None and not isinstance(out, BaseException):
                        _append(given_log, index)
            except (asyncio.CancelledError, ProcessDied):
                pass
            return saver.writes, saver.stopped, given

    return vtime.run(main(), strict=False)


def _append(path: Path, index: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{index}\n".encode())
    finally:
        os.close(fd)


def _killed_child(
    graph_name: str, path: str, after: int, durability: Durability, given_log: str
) -> None:
    """The first run, in a child that SIGKILLs itself after write ``after``."""
    graph = GRAPHS[graph_name](Work())
    store: dict[str, Any] = {"path": Path(path)}
    _first_run(
        graph,
        _sqlite,
        store,
        after=after,
        stop="sigkill",
        durability=durability,
        given_log=Path(given_log),
    )


def _first_run_killed(
    graph_name: str, store: dict[str, Any], *, after: int, durability: Durability, given_log: Path
) -> list[tuple[int, Any]]:
    """The first run in a child process that SIGKILLs itself right after write ``after``."""
    code = run_in_child(
        _killed_child, graph_name, str(store["path"]), after, durability, str(given_log)
    )
    assert code == -signal.SIGKILL, f"the child exited with {code}, not by SIGKILL"
    lines = given_log.read_text().split() if given_log.exists() else []
    return [(int(line), None) for line in lines]


async def _stored(graph: Any, disk: BaseCheckpointSaver[Any]) -> list[Any]:
    """What the store holds of each agent: its latest state snapshot."""
    stored = graph.copy(update={"checkpointer": disk})
    return [
        await stored.aget_state({"configurable": {"thread_id": f"b/{i}"}}) for i in range(AGENTS)
    ]


def _count(messages: list[BaseMessage], kind: type) -> int:
    return sum(isinstance(m, kind) for m in messages)


def _stop_and_resume(
    graph_name: str,
    saver_name: str,
    durability: Durability,
    stop: Stop,
    after: int | None,
    tmp: Path,
) -> tuple[int, bool]:
    """Stop a batch at write ``after``, run it again, check every outcome (module docstring).

    Returns the first run's (writes, stopped); a SIGKILLed first run reports (after, True).
    """
    work = Work()
    graph = GRAPHS[graph_name](work)
    open_disk = SAVERS[saver_name]
    store: dict[str, Any] = {"path": tmp / f"{stop}-{after}.sqlite"}
    if stop == "sigkill" and after is not None:
        given_log = tmp / f"given-{after}.txt"
        given = _first_run_killed(
            graph_name, store, after=after, durability=durability, given_log=given_log
        )
        writes, stopped = after, True
        work = Work()  # the child's counts died with it; only the resume's are compared
        graph = GRAPHS[graph_name](work)
    else:
        writes, stopped, given = _first_run(
            graph, open_disk, store, after=after, stop=stop, durability=durability
        )

    async def resume() -> tuple[list[Any], list[Any], Work]:
        async with open_disk(store) as disk:
            snapshots = await _stored(graph, disk)
            before = Work()
            before.model.update(work.model)
            before.tools.update(work.tools)
            gate = ConcurGate(graph, law=FixedLaw(WINDOW), checkpointer=disk)
            outputs = await gate.abatch(_tasks(), batch_id="b", durability=durability)
            return snapshots, outputs, before

    snapshots, outputs, before = vtime.run(resume(), strict=False)
    for index, out in given:
        if isinstance(out, AgentDrainedError):
            continue
        if out is not None:
            assert_finished(f"agent-{index}", out)
        assert snapshots[index].tasks == (), f"agent-{index} was given before its store finished"
    for index, out in enumerate(outputs):
        agent = f"agent-{index}"
        assert_finished(agent, out)
        held = snapshots[index].values.get("messages", [])
        assert work.model[agent] - before.model[agent] == STEPS + 1 - _count(held, AIMessage), (
            f"{agent}: store held {len(held)} messages"
        )
        assert work.tools[agent] - before.tools[agent] == WIDTH * STEPS - _count(held, ToolMessage)
    return writes, stopped


def _every_write(
    graph_name: str, saver_name: str, durability: Durability, stop: Stop, tmp: Path
) -> list[int]:
    """Stop after write 0, 1, ... up to the last write of an uninterrupted run."""
    total, stopped = _stop_and_resume(graph_name, saver_name, durability, stop, None, tmp)
    assert not stopped and total > 0
    for after in range(total):
        _, stopped = _stop_and_resume(graph_name, saver_name, durability, stop, after, tmp)
        assert stopped, f"the run made {total} writes uninterrupted, fewer with a stop at {after}"
    return list(range(total))


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
@pytest.mark.parametrize("graph_name", ["react", "fanout"])
@pytest.mark.parametrize("stop", ["kill", "cancel", "drain-cancel"])
def test_stopped_at_every_write_then_resumed_every_agent_finishes_each_step_once(
    stop: Stop, graph_name: str, durability: Durability, tmp_path: Path
) -> None:
    points = _every_write(graph_name, "memory", durability, stop, tmp_path)
    assert len(points) >= AGENTS  # at least one checkpoint per agent


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_sqlite_batch_sigkilled_at_every_write_resumes_exactly(
    durability: Durability, tmp_path: Path
) -> None:
    """The process really dies (a forked child SIGKILLs itself right after write N), with the
    checkpoints in SQLite: the issue's own setting, through the Python API."""
    pytest.importorskip("aiosqlite")
    points = _every_write("react", "sqlite", durability, "sigkill", tmp_path)
    assert len(points) >= AGENTS


def test_the_old_rule_next_is_empty_would_call_a_cut_step_finished() -> None:
    """The cause: after a step's writes but before the checkpoint that closes the step,
    ``next`` is empty although LangGraph has work left (``tasks`` is not)."""
    work = Work()
    graph = react_graph(work)
    store: dict[str, Any] = {}
    # Write 1 is the input checkpoint, write 2 the writes of the __start__ task.
    _first_run(graph, _memory, store, after=2, stop="kill", durability="async")
    snapshots = vtime.run(_stored(graph, store["saver"]))
    cut = [s for s in snapshots if s.metadata is not None and not s.next]
    assert cut, "no thread was cut between a step's writes and its checkpoint"
    assert all(s.tasks for s in cut)


def test_the_sweep_covers_a_write_per_task_and_step(tmp_path: Path) -> None:
    """The sweep is not vacuous: the uninterrupted batch makes every write counted here."""
    total, _ = _stop_and_resume("react", "memory", "async", "kill", None, tmp_path)
    # Per agent: the input checkpoint, then per super-step (__start__, then think / tools
    # alternating up to the final think) its task's writes and the checkpoint closing it.
    supersteps = 1 + 2 * STEPS + 1
    assert total == AGENTS * (1 + 2 * supersteps)

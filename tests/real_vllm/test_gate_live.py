"""The gate against a real vLLM: real LangGraph agents, all four ways in, vLLM's own counters.

Every agent here is a LangGraph graph whose LLM node calls ``ChatOpenAI`` (``ignore_eos`` and
``max_tokens``, so each step generates exactly that many tokens on the random-weight model)
against the tier's one server. Each test writes text no earlier test wrote (a per-test nonce
in the first block), so no cached prefix of another test can change what it measures.

What is checked, from both sides:

* the server: ``vllm:num_requests_running + vllm:num_requests_waiting`` sampled from
  ``/metrics`` during the run never exceeds the window (an admitted agent has at most one
  request in flight), and the ``vllm:num_preemptions_total`` delta of each run;
* the client: chat requests in flight on the model's HTTP client (counted by httpx event
  hooks), and the gate's own ``statistics()``.

Nothing waits on wall-clock time: the metrics sampler only observes, and every assertion is
about counts, never about speed.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurGate,
    ConcurLaw,
    ConcurMiddleware,
    FixedLaw,
    SessionStatistics,
    gate_node,
)
from concur_langgraph.bench._runner import REAL_KEEPALIVE_S
from concur_langgraph.testing.vllm_cpu import RunningServer

ROOT = Path(__file__).resolve().parents[2]
KV_TOKENS = 4096  # the tier's 16 MiB cache
WAYS = ("wrapper", "callback", "middleware", "gate_node")
# Words the tier's tiny BPE tokenizer encodes as one token each (so word counts are token
# counts, give or take the chat template).
WORDS = (
    "about an and assistant block cache data explain for hello how in is me memory model "
    "number of on please prefix queue request server story tell the to token user what why "
    "with world"
).split()
_nonce = itertools.count()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


class State(TypedDict):
    messages: Annotated[list[AnyMessage], operator.add]
    steps_left: int


# -- what the server and the client saw ---------------------------------------------------


def _parse(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


@dataclass
class Watch:
    """Server- and client-side observations of one run."""

    server_max_requests: int = 0
    """Largest running + waiting seen on /metrics."""
    scrapes: int = 0
    inflight: int = 0
    max_inflight: int = 0
    """Largest number of chat requests in flight on the model's HTTP client."""
    requests: int = 0
    preemptions: int = 0
    """vllm:num_preemptions_total delta over the run."""
    generation_tokens: int = 0
    """vllm:generation_tokens_total delta over the run."""
    stats: list[SessionStatistics] = field(default_factory=list)
    """Gate statistics sampled during the run."""


@asynccontextmanager
async def _chat_model(
    server: RunningServer, watch: Watch, *, max_tokens: int
) -> AsyncIterator[ChatOpenAI]:
    """ChatOpenAI on the server, its HTTP client counting requests in flight; closed after."""

    async def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            watch.requests += 1
            watch.inflight += 1
            watch.max_inflight = max(watch.max_inflight, watch.inflight)

    async def on_response(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/chat/completions"):
            watch.inflight -= 1

    client = httpx.AsyncClient(
        # Idle connections retire before vLLM's 5 s keep-alive closes them (REAL_KEEPALIVE_S):
        # with max_retries=0 a request racing that close was a failed agent.
        limits=httpx.Limits(
            max_connections=256, max_keepalive_connections=None, keepalive_expiry=REAL_KEEPALIVE_S
        ),
        timeout=600.0,
        event_hooks={"request": [on_request], "response": [on_response]},
    )
    async with client:
        yield ChatOpenAI(
            model=server.model,
            base_url=server.openai_base_url,
            api_key="EMPTY",  # type: ignore[arg-type]
            max_tokens=max_tokens,  # type: ignore[call-arg]
            extra_body={"ignore_eos": True},
            timeout=600,
            max_retries=0,  # a retry would hide a failure and redo work the counters then show
            http_async_client=client,
        )


@asynccontextmanager
async def _watching(
    server: RunningServer,
    watch: Watch,
    stats: Callable[[], SessionStatistics | None] | None = None,
) -> AsyncIterator[Watch]:
    """Sample /metrics (and the gate's statistics) while the body runs."""
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def scrape() -> dict[str, float]:
            response = await client.get(f"{server.base_url}/metrics")
            response.raise_for_status()
            return _parse(response.text)

        before = await scrape()

        async def sample() -> None:
            while True:
                m = await scrape()
                watch.scrapes += 1
                busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
                watch.server_max_requests = max(watch.server_max_requests, int(busy))
                if stats is not None and (s := stats()) is not None:
                    watch.stats.append(s)
                await asyncio.sleep(0.05)  # sampling period, not a wait for an outcome

        task = asyncio.create_task(sample())
        try:
            yield watch
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        after = await scrape()
    watch.preemptions = int(
        after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    )
    watch.generation_tokens = int(
        after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    )


# -- agents ---------------------------------------------------------------------------------


def _react_graph(
    model: ChatOpenAI, *, observation_words: int, tool_s: float, gate_node: Any = None
) -> Any:
    """LLM step -> tool step (a latency and an observation) -> LLM step ..., growing context."""

    async def llm(state: State) -> dict[str, Any]:
        reply = await model.ainvoke(state["messages"])
        return {"messages": [reply], "steps_left": state["steps_left"] - 1}

    async def tool(state: State) -> dict[str, Any]:
        await asyncio.sleep(tool_s)  # the tool's latency: the agent keeps its slot meanwhile
        rng = random.Random(len(state["messages"]) * 7919 + state["steps_left"])
        return {"messages": [HumanMessage("Observation: " + _words(rng, observation_words))]}

    async def route(state: State) -> str:
        return "tool" if state["steps_left"] > 0 else END

    builder = StateGraph(State)
    builder.add_node("llm", llm)
    builder.add_node("tool", tool)
    if gate_node is not None:
        builder.add_node("admit", gate_node)
        builder.add_edge(START, "admit")
        builder.add_edge("admit", "llm")
        builder.add_edge("tool", "admit")
    else:
        builder.add_edge(START, "llm")
        builder.add_edge("tool", "llm")
    builder.add_conditional_edges("llm", route, ["tool", END])
    return builder.compile()


def _inputs(n: int, steps: int, *, system_words: int, task_words: int) -> list[dict[str, Any]]:
    nonce = f"{next(_nonce)} {uuid.uuid4().hex}"
    system = _words(random.Random(nonce), system_words)
    return [
        {
            "messages": [
                SystemMessage(f"{nonce} {system}"),
                HumanMessage(_words(random.Random(f"{nonce}:{i}"), task_words)),
            ],
            "steps_left": steps,
        }
        for i in range(n)
    ]


def _configs(n: int, callbacks: list[Any] | None = None) -> list[RunnableConfig]:
    # One thread_id per agent: the gate's agent identity.
    configs = [RunnableConfig(configurable={"thread_id": str(uuid.uuid4())}) for _ in range(n)]
    if callbacks is not None:
        for config in configs:
            config["callbacks"] = callbacks
    return configs


@dataclass
class Run:
    results: list[Any]
    watch: Watch
    final: SessionStatistics | None


async def _run_way(
    way: str, server: RunningServer, *, agents: int, steps: int, window: int, max_tokens: int
) -> Run:
    """``agents`` agents of ``steps`` LLM steps through one way in, with ``FixedLaw(window)``."""
    watch = Watch()
    async with _chat_model(server, watch, max_tokens=max_tokens) as model:
        return await _run_way_on(
            way, server, watch, model, agents=agents, steps=steps, window=window
        )


async def _run_way_on(
    way: str,
    server: RunningServer,
    watch: Watch,
    model: ChatOpenAI,
    *,
    agents: int,
    steps: int,
    window: int,
) -> Run:
    inputs = _inputs(agents, steps, system_words=40, task_words=20)
    law = FixedLaw(window)
    if way == "wrapper":
        graph = _react_graph(model, observation_words=30, tool_s=0.05)
        gate = ConcurGate(graph, law=law, progress=False)
        async with _watching(server, watch, gate.statistics):
            results = await gate.abatch(inputs, return_exceptions=True)
        return Run(results=results, watch=watch, final=gate.statistics())
    if way == "gate_node":
        graph = _react_graph(model, observation_words=30, tool_s=0.05, gate_node=gate_node())
        gate = ConcurGate(graph, law=law, progress=False)
        async with _watching(server, watch, gate.statistics):
            results = await gate.abatch(inputs, return_exceptions=True)
        return Run(results=results, watch=watch, final=gate.statistics())
    if way == "callback":
        graph = _react_graph(model, observation_words=30, tool_s=0.05)
        async with ConcurCallbackHandler(law=law) as handler:
            async with _watching(server, watch, handler.statistics):
                results = await graph.abatch(
                    inputs, config=_configs(agents, callbacks=[handler]), return_exceptions=True
                )
            final = handler.statistics()
        return Run(results=results, watch=watch, final=final)
    assert way == "middleware"
    middleware = ConcurMiddleware(law=law)
    # No tools: the tiny model's text is never a tool call, and vLLM refuses tool_choice
    # "auto" unless started with a tool parser. One model call per agent, each gated.
    agent = create_agent(model, [], middleware=[middleware])
    async with middleware:
        async with _watching(server, watch, middleware.statistics):
            results = await agent.abatch(
                [{"messages": i["messages"]} for i in inputs],
                config=_configs(agents),
                return_exceptions=True,
            )
        final = middleware.statistics()
    return Run(results=results, watch=watch, final=final)


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_fixed_window_holds_on_the_server_for_every_way_in(
    way: str, real_vllm: RunningServer
) -> None:
    agents, window, tokens = 8, 2, 24
    steps = 1 if way == "middleware" else 3
    run = await _run_way(
        way, real_vllm, agents=agents, steps=steps, window=window, max_tokens=tokens
    )
    failed = [r for r in run.results if isinstance(r, BaseException)]
    assert failed == []
    assert len(run.results) == agents
    for result in run.results:
        # system + task + (answer, observation) x (steps - 1) + last answer
        assert len(result["messages"]) == 2 + 2 * steps - 1
    watch = run.watch
    assert watch.requests == agents * steps
    assert watch.generation_tokens == agents * steps * tokens
    # The client never had more chat requests out than the window, and neither did the server.
    assert 1 <= watch.max_inflight <= window
    assert watch.scrapes > 0
    assert watch.server_max_requests <= window
    # The gate's own accounting agrees.
    assert watch.stats, "no gate statistics sampled during the run"
    assert all(s.gate.window.holders <= window == s.gate.window.limit for s in watch.stats)
    assert run.final is not None
    # One count per LLM call, whatever the way in (the gate node admits without counting).
    assert run.final.gate.llm_calls == agents * steps, run.final.gate
    # Every call's usage reached the gate's accounting: exactly the tokens the server made.
    assert run.final.gate.tokens_generated == agents * steps * tokens
    assert run.final.gate.usage_missing == 0
    assert run.final.gate.window.holders == 0
    assert run.final.gate.completed == agents


async def test_concur_law_drives_the_window_from_live_metrics(real_vllm: RunningServer) -> None:
    watch = Watch()
    agents, steps = 12, 4
    inputs = _inputs(agents, steps, system_words=100, task_words=30)
    async with _chat_model(real_vllm, watch, max_tokens=32) as model:
        graph = _react_graph(model, observation_words=60, tool_s=0.1)
        gate = ConcurGate(
            graph, vllm_url=real_vllm.base_url, law=ConcurLaw(), interval_s=0.2, progress=False
        )
        async with _watching(real_vllm, watch, gate.statistics):
            results = await gate.abatch(inputs, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(len(r["messages"]) == 2 + 2 * steps - 1 for r in results)
    stats = gate.statistics()
    assert stats is not None and stats.controller is not None
    controller = stats.controller
    assert controller.ticks > 0
    assert controller.errors == 0
    last = controller.last_sample
    assert last is not None
    assert not controller.stale and not last.stale
    # The samples are the live server's: its cache geometry, and (per interval) the tokens
    # of this batch while it ran.
    assert last.kv_capacity_tokens == KV_TOKENS
    seen = [s.controller.last_sample for s in watch.stats if s.controller is not None]
    live_samples = [x for x in seen if x is not None]
    assert any(x.generation_tokens > 0 for x in live_samples)
    assert any(x.prompt_tokens > 0 for x in live_samples)
    # KV usage is an instantaneous gauge: a scrape between two short requests reads 0, so
    # only its range is checked here (the tokens above are per-interval counters).
    assert all(0.0 <= x.kv_usage <= 1.0 for x in live_samples)
    # The window the gate enforces is the controller's, and it never closed.
    assert controller.window == stats.gate.window.limit
    live = [s for s in watch.stats if s.controller is not None and s.controller.ticks > 0]
    assert live
    assert all(s.gate.window.limit == s.controller.window >= 1 for s in live if s.controller)


async def test_gate_cuts_preemptions_of_an_oversubscribed_batch(real_vllm: RunningServer) -> None:
    """32 growing agents overflow the 4096-token cache; FixedLaw(4) keeps 4 contexts, each at
    most ~7 blocks of 128, inside its 31 usable blocks.

    vLLM admits a request only when its whole prompt fits, so preemptions come from running
    requests that need a new block while they decode: each step generates 128 tokens, a block
    or more, so every step of every admitted request needs one (with 48-token answers most
    steps fit in the last block and a run preempted 0-5 times).
    """
    agents, steps, tokens, window = 32, 3, 128, 4

    async def batch(gated: bool) -> Watch:
        watch = Watch()
        inputs = _inputs(agents, steps, system_words=100, task_words=30)
        async with _chat_model(real_vllm, watch, max_tokens=tokens) as model:
            graph = _react_graph(model, observation_words=80, tool_s=0.05)
            if gated:
                gate = ConcurGate(graph, law=FixedLaw(window), progress=False)
                async with _watching(real_vllm, watch, gate.statistics):
                    results = await gate.abatch(inputs, return_exceptions=True)
            else:
                async with _watching(real_vllm, watch):
                    results = await graph.abatch(inputs, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert watch.generation_tokens == agents * steps * tokens
        return watch

    ungated = await batch(gated=False)
    gated = await batch(gated=True)
    counts = f"preemptions: ungated {ungated.preemptions}, FixedLaw({window}) {gated.preemptions}"
    assert ungated.preemptions > 0, counts
    assert gated.preemptions < ungated.preemptions, counts
    # In flight as the client counts them (exact); the server's running count is sampled by
    # scrapes, which a loaded machine spaces out (a clean-clone run next to a benchmark saw a
    # peak of 2 running requests in 13 scrapes while 32 were in flight).
    assert 1 <= gated.max_inflight <= window
    assert gated.server_max_requests <= window
    assert ungated.max_inflight > window


@pytest.mark.parametrize(
    "example",
    [
        "wrapper_abatch",
        "callback_handler",
        # create_agent binds its tool (tool_choice "auto"): the tier's server runs with
        # --enable-auto-tool-choice, without which vLLM answers 400 to every call.
        "create_agent_middleware",
        "gate_node",
    ],
)
def test_example_runs_against_real_vllm(example: str, real_vllm: RunningServer) -> None:
    # The examples use the default law (ConcurLaw on the server's /metrics).
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{example}.py"), "--url", real_vllm.base_url,
         "--model", real_vllm.model, "--agents", "6", "--steps", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 agents finished, 0 failed" in out.stdout

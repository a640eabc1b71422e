"""The gate on SGLang's exposition and on an in-process registry: the window, the law and the
exporter see the same Sample whichever engine serves, through every way in."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurGate,
    ConcurLaw,
    ConcurMiddleware,
    InProcessMetricsSource,
    Sample,
    SessionOptions,
)
from concur_langgraph.errors import ConfigError, MetricsDisabledError
from concur_langgraph.sim import SimServer, get_preset, render_metrics
from concur_langgraph.testing.agent_loop import loop_tasks, observation_loop
from concur_langgraph.testing.sim_process import served_simulator
from concur_langgraph.testing.vtime_fixtures import virtual_time

AGENTS = 8
STEPS = 3
CAPACITY = get_preset("test-tiny").kv_capacity_tokens


class RecordingLaw:
    """The paper's law, keeping every sample it was given."""

    def __init__(self) -> None:
        self.law = ConcurLaw()
        self.samples: list[Sample] = []
        self.windows: list[int] = []

    def next_window(self, window: int, sample: Sample) -> int:
        self.samples.append(sample)
        self.windows.append(self.law.next_window(window, sample))
        return self.windows[-1]


def test_concur_gate_on_a_served_sglang_works_on_the_first_try() -> None:
    """``ConcurGate(graph, vllm_url=SGLANG_URL)``: a real socket, the simulator speaking
    SGLang's /metrics, the default law and options but a short tick; then the exporter's
    view of the samples it took."""
    with served_simulator("--preset", "test-tiny", "--engine", "sglang") as sim:

        async def main() -> tuple[list[Any], dict[str, float], Any]:
            model = ChatOpenAI(
                model="test-tiny",
                base_url=f"{sim.url}/v1",
                api_key="EMPTY",  # type: ignore[arg-type]
                max_tokens=8,  # type: ignore[call-arg]
                max_retries=0,
                extra_body={"ignore_eos": True},
            )
            graph = observation_loop(model, steps=STEPS, tool_s=0.2)
            async with ConcurGate(
                graph, vllm_url=sim.url, interval_s=0.2, metrics_port=0, progress=False
            ) as gate:
                results = await gate.abatch(loop_tasks(AGENTS))
                session = gate.session
                assert session is not None and session.metrics_url is not None
                async with httpx.AsyncClient() as client:
                    text = (await client.get(session.metrics_url)).text
                stats = gate.statistics()
            exported = {
                s.name: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if not s.labels
            }
            return results, exported, stats

        results, exported, stats = asyncio.run(main())
    assert len(results) == AGENTS
    controller = stats.controller
    assert controller is not None and controller.ticks >= 1 and controller.errors == 0
    assert controller.last_sample is not None
    assert controller.last_sample.kv_capacity_tokens == CAPACITY
    assert exported["concur_sample_kv_capacity_tokens"] == CAPACITY
    assert exported["concur_agents_completed_total"] == AGENTS
    assert exported["concur_controller_errors_total"] == 0


@virtual_time
async def test_the_law_moves_the_window_on_sglang_signals_as_on_vllm() -> None:
    windows: dict[str, list[int]] = {}
    samples: dict[str, list[Sample]] = {}
    for engine in ("vllm", "sglang"):
        async with SimServer("test-tiny", engine=engine) as server, server.http_client() as c:
            law = RecordingLaw()
            gate = ConcurGate(
                observation_loop(server.chat_model(max_tokens=8), steps=STEPS, tool_s=2.0),
                metrics_url=server.root_url,
                http_client=c,
                law=law,
                initial_window=2,
                interval_s=0.5,
                progress=False,
            )
            results = await gate.abatch(loop_tasks(AGENTS))
            assert len(results) == AGENTS
            windows[engine] = law.windows
            samples[engine] = law.samples
    # Same engine model, same agents, same law: the same decisions, read from either page.
    assert windows["sglang"] == windows["vllm"]
    assert len(set(windows["vllm"])) > 1, "the law never moved the window"
    for ours, theirs in zip(samples["sglang"], samples["vllm"], strict=True):
        assert (ours.kv_usage, ours.running, ours.waiting) == (
            theirs.kv_usage,
            theirs.running,
            theirs.waiting,
        )
        assert ours.prefix_hit_rate == theirs.prefix_hit_rate
        assert ours.preemptions == theirs.preemptions
        assert ours.generation_tokens == theirs.generation_tokens


def test_metrics_url_is_vllm_url_under_an_engine_neutral_name() -> None:
    options = SessionOptions(metrics_url="http://h:30000/v1", law=ConcurLaw())
    assert options.urls == ("http://h:30000",) and options.vllm_url == ("http://h:30000",)
    assert options.url_field == "metrics_url"
    with pytest.raises(ConfigError, match=r"^metrics_url: give either vllm_url or metrics_url"):
        SessionOptions(metrics_url="http://h:1", vllm_url="http://h:1")
    with pytest.raises(ConfigError, match=r"^metrics_url: 'h:1' is not an http"):
        SessionOptions(metrics_url="h:1")
    with pytest.raises(ConfigError, match=r"^source: give either metrics_url or source"):
        SessionOptions(metrics_url="http://h:1", source=InProcessMetricsSource())


@virtual_time
async def test_a_served_vllm_with_stats_off_fails_at_entry_naming_the_flag() -> None:
    page = (
        "# HELP http_requests_total Total number of requests by method, status and handler.\n"
        "# TYPE http_requests_total counter\n"
        "# TYPE python_info gauge\n"
        'python_info{implementation="CPython",major="3",minor="11"} 1.0\n'
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=page))
    async with httpx.AsyncClient(transport=transport) as client:
        gate = ConcurGate(
            observation_loop(None, steps=1), vllm_url="http://h:8000", http_client=client
        )
        with pytest.raises(MetricsDisabledError, match="--disable-log-stats"):
            await gate.abatch(loop_tasks(1))


# -- an engine in this process ---------------------------------------------------------------


class EngineRegistry(Collector):
    """The simulator's engine exporting into a registry of this process under vLLM's names,
    as vLLM's stat logger does for an ``AsyncLLM`` in-process (no HTTP server)."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    def collect(self) -> Any:
        text = render_metrics(self.server.engine.metrics(), self.server.config, created=0.0)
        yield from text_string_to_metric_families(text.decode())


@tool
async def lookup(query: str) -> str:
    """Look something up."""
    await asyncio.sleep(2.0)
    return f"nothing found for {query}"


@pytest.mark.parametrize("way", ["gate", "handler", "middleware"])
@virtual_time
async def test_an_in_process_source_drives_every_way_in(way: str) -> None:
    # The simulator answers bound tools with STEPS tool calls, then the answer.
    config = dataclasses.replace(get_preset("test-tiny"), tool_call_turns=(STEPS, STEPS))
    async with SimServer(config) as server:
        registry = CollectorRegistry()
        registry.register(EngineRegistry(server))
        law = RecordingLaw()
        options: dict[str, Any] = {
            "source": InProcessMetricsSource(registry),
            "law": law,
            "initial_window": 2,
            "interval_s": 0.5,
        }
        model = server.chat_model(max_tokens=8)
        if way == "gate":
            graph = observation_loop(model, steps=STEPS, tool_s=2.0)
            results = await ConcurGate(graph, progress=False, **options).abatch(loop_tasks(AGENTS))
        elif way == "handler":
            graph = observation_loop(model, steps=STEPS, tool_s=2.0)
            async with ConcurCallbackHandler(**options) as handler:
                results = await graph.abatch(
                    loop_tasks(AGENTS),
                    [
                        {"callbacks": [handler], "configurable": {"thread_id": f"t{i}"}}
                        for i in range(AGENTS)
                    ],
                )
        else:
            middleware = ConcurMiddleware(**options)
            agent = create_agent(model, [lookup], middleware=[middleware])
            async with middleware:
                results = await agent.abatch(
                    [{"messages": [HumanMessage(f"question {i}")]} for i in range(AGENTS)]
                )
        assert len(results) == AGENTS
        assert law.samples
        assert all(s.kv_capacity_tokens == CAPACITY for s in law.samples)
        assert sum(s.generation_tokens for s in law.samples) > 0

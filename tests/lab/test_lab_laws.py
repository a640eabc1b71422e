"""The candidate laws of the law lab (benchmarks/lab_laws.py): each decision on small samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from lab_laws import ClimbLaw, DescentLaw, GoodputLaw, LossAimdLaw, ProbeLaw, WorkingSetLaw

from concur_langgraph import ConfigError, ControlLaw, Sample
from concur_langgraph.core.window import OPEN


def sample(
    *,
    kv_usage: float = 0.5,
    running: int = 5,
    waiting: int = 0,
    waiting_capacity: int | None = 0,
    preemptions: int = 0,
    generation_tokens: int = 100,
    capacity: int | None = 1000,
    interval_s: float | None = 1.0,
) -> Sample:
    return Sample(
        time=0.0,
        kv_usage=kv_usage,
        prefix_hit_rate=0.5,
        prefix_queries=100,
        prefix_hits=50,
        preemptions=preemptions,
        prompt_tokens=100,
        generation_tokens=generation_tokens,
        running=running,
        waiting=waiting,
        waiting_capacity=waiting_capacity,
        kv_capacity_tokens=capacity,
        interval_s=interval_s,
    )


def drive(law: ControlLaw, samples: Sequence[Sample], window: int = 4) -> list[int]:
    out = []
    for s in samples:
        window = law.next_window(window, s)
        out.append(window)
    return out


# A full cache: 1000 tokens over 10 running requests is a footprint of 100 tokens per agent, so
# the working set is 10 agents; 10 more requests wait, so the engine holds 20.
PRESSURE: dict[str, Any] = {"kv_usage": 1.0, "running": 10, "waiting": 10, "waiting_capacity": 10}


@pytest.mark.parametrize(
    "law", [WorkingSetLaw(), LossAimdLaw(), GoodputLaw(), ClimbLaw(), DescentLaw(), ProbeLaw()]
)
def test_laws_follow_the_protocol(law: ControlLaw) -> None:
    assert isinstance(law, ControlLaw)


# -- WorkingSetLaw ------------------------------------------------------------------------------


def test_working_set_is_capacity_over_footprint() -> None:
    # 0.5 * 1000 tokens held by 5 running requests: 100 tokens each -> 10 agents fit.
    assert WorkingSetLaw().next_window(4, sample(kv_usage=0.5, running=5)) == 10


def test_working_set_fill_scales_the_window() -> None:
    assert WorkingSetLaw(fill=0.5).next_window(4, sample(kv_usage=0.5, running=5)) == 5


def test_working_set_holds_without_capacity() -> None:
    assert WorkingSetLaw().next_window(7, sample(capacity=None)) == 7


def test_working_set_holds_while_nothing_runs() -> None:
    assert WorkingSetLaw().next_window(7, sample(running=0)) == 7


def test_working_set_smooths_the_footprint() -> None:
    law = WorkingSetLaw(smoothing=0.5)
    law.next_window(4, sample(kv_usage=0.5, running=5))  # footprint 100
    # A sample of footprint 300 moves the average halfway, to 200: 1000 / 200 = 5 agents.
    assert law.next_window(10, sample(kv_usage=0.6, running=2)) == 5


def test_working_set_never_returns_zero() -> None:
    assert WorkingSetLaw(fill=0.01).next_window(4, sample(kv_usage=1.0, running=1)) == 1


def test_working_set_starts_open() -> None:
    assert WorkingSetLaw().starts_open


@pytest.mark.parametrize(("field", "value"), [("fill", 0), ("smoothing", 0), ("smoothing", 1.5)])
def test_working_set_rejects_bad_constants(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        WorkingSetLaw(**{field: value})  # type: ignore[arg-type]


# -- LossAimdLaw --------------------------------------------------------------------------------


def test_aimd_decreases_on_a_preemption() -> None:
    assert LossAimdLaw(beta=0.5).next_window(10, sample(preemptions=1)) == 5


def test_aimd_decreases_on_waiting_for_capacity() -> None:
    assert LossAimdLaw(beta=0.5).next_window(10, sample(waiting_capacity=3)) == 5


def test_aimd_increases_when_busy_without_loss() -> None:
    assert LossAimdLaw(alpha=2).next_window(10, sample(running=3)) == 12


def test_aimd_holds_when_idle() -> None:
    assert LossAimdLaw().next_window(10, sample(running=0)) == 10


def test_aimd_treats_missing_waiting_capacity_as_no_loss() -> None:
    assert LossAimdLaw(alpha=1).next_window(10, sample(waiting_capacity=None)) == 11


@pytest.mark.parametrize(("field", "value"), [("alpha", 0), ("beta", 1.0), ("beta", 0)])
def test_aimd_rejects_bad_constants(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        LossAimdLaw(**{field: value})  # type: ignore[arg-type]


# -- GoodputLaw ---------------------------------------------------------------------------------


def goodput_law() -> GoodputLaw:
    return GoodputLaw(settle_s=1.0, measure_s=2.0, backoff_s=2.0, margin=0.1)


def test_goodput_law_stays_open_without_pressure() -> None:
    assert drive(goodput_law(), [sample()] * 5) == [OPEN] * 5


def test_goodput_law_waits_for_the_backoff_before_a_trial() -> None:
    assert goodput_law().next_window(OPEN, sample(**PRESSURE)) == OPEN


def test_goodput_law_tries_the_working_set_under_pressure() -> None:
    law = goodput_law()
    assert drive(law, [sample(**PRESSURE)] * 2) == [OPEN, 10]
    assert law.phase == "settle"


def test_goodput_law_drops_a_trial_that_does_not_pay() -> None:
    law = goodput_law()
    # Open goodput 100 tok/s, trial goodput 105 tok/s: below the 10 % margin.
    windows = drive(
        law,
        [sample(**PRESSURE)] * 3 + [sample(**PRESSURE, generation_tokens=105)] * 2,
    )
    assert windows[-1] == OPEN
    assert law.phase == "open"


def test_goodput_law_keeps_a_trial_that_pays() -> None:
    law = goodput_law()
    windows = drive(
        law,
        [sample(**PRESSURE)] * 3 + [sample(**PRESSURE, generation_tokens=200)] * 2,
    )
    assert windows[-1] == 10
    assert law.phase == "restricted"


def test_goodput_law_backs_off_after_a_failed_trial() -> None:
    law = goodput_law()
    drive(law, [sample(**PRESSURE)] * 5)  # trial at t=2 fails at t=5 (no gain)
    # Next trial needs open_s >= 2 + 2*2 = 6 s of open running: not after 3 more seconds.
    assert drive(law, [sample(**PRESSURE)] * 3, window=OPEN) == [OPEN] * 3


def test_goodput_law_rejects_a_zero_measurement_span() -> None:
    with pytest.raises(ConfigError, match="measure_s"):
        GoodputLaw(measure_s=0)


# -- ClimbLaw -----------------------------------------------------------------------------------


def test_climb_law_grows_at_most_by_the_ramp_per_tick() -> None:
    # Working set 10 agents, window 4: at most 4 * 1.5 = 6.
    assert ClimbLaw(ramp=1.5).next_window(4, sample(kv_usage=0.5, running=5)) == 6


def test_climb_law_shrinks_at_once() -> None:
    assert ClimbLaw().next_window(40, sample(kv_usage=0.5, running=5)) == 10


def test_climb_law_keeps_an_up_probe_that_pays() -> None:
    law = ClimbLaw(settle_s=1.0, measure_s=2.0, step=2.0, margin=0.05)
    # base 2 s at 100 tok/s -> probe k=2: settle 1 s, measure 2 s at 200 tok/s -> kept.
    drive(law, [sample()] * 3 + [sample(generation_tokens=200)] * 2, window=10)
    assert law.k == 2.0


def test_climb_law_reverts_a_probe_that_does_not_pay() -> None:
    law = ClimbLaw(settle_s=1.0, measure_s=2.0, step=2.0, margin=0.05)
    drive(law, [sample()] * 5, window=10)
    assert law.k == 1.0


# -- DescentLaw ---------------------------------------------------------------------------------


def descent_law() -> DescentLaw:
    return DescentLaw(settle_s=1.0, measure_s=2.0, wait_s=2.0, tolerance=0.03, hold_s=5.0)


def test_descent_law_stays_open_without_pressure() -> None:
    assert drive(descent_law(), [sample()] * 5) == [OPEN] * 5


def test_descent_law_first_trial_is_half_of_what_the_engine_holds() -> None:
    assert drive(descent_law(), [sample(**PRESSURE)] * 2) == [OPEN, 10]


def test_descent_law_settles_until_the_engine_drained() -> None:
    law = descent_law()
    drive(law, [sample(**PRESSURE)] * 2)
    # The engine still holds 20 requests > window 10: keep settling.
    law.next_window(10, sample(**PRESSURE))
    assert law.phase == "settle"


def test_descent_law_halves_again_when_no_worse() -> None:
    law = descent_law()
    drained = {**PRESSURE, "waiting": 0}
    windows = drive(law, [sample(**PRESSURE)] * 2 + [sample(**drained, generation_tokens=99)] * 3)
    assert windows[-1] == 5


def test_descent_law_reopens_when_the_first_halving_is_worse() -> None:
    law = descent_law()
    drained = {**PRESSURE, "waiting": 0}
    windows = drive(law, [sample(**PRESSURE)] * 2 + [sample(**drained, generation_tokens=50)] * 3)
    assert windows[-1] == OPEN
    assert law.wait_s == 2.0 + 2 * 2.0


def test_descent_law_holds_the_last_good_window_after_a_worse_halving() -> None:
    law = descent_law()
    drained = {**PRESSURE, "waiting": 0}
    drive(law, [sample(**PRESSURE)] * 2 + [sample(**drained)] * 3)  # 10 kept, trying 5
    small = sample(kv_usage=1.0, running=4, generation_tokens=50)  # the engine holds 4 <= 5
    windows = drive(law, [small] * 3, window=5)
    assert windows[-1] == 10
    assert law.phase == "hold"


@pytest.mark.parametrize(("field", "value"), [("tolerance", 1.5), ("measure_s", 0), ("wait_s", -1)])
def test_descent_law_rejects_bad_constants(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        DescentLaw(**{field: value})  # type: ignore[arg-type]


# -- samples with the proposed extension fields -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtSample(Sample):
    """A Sample with the fields docs/laws.md proposes (the laws read them with getattr)."""

    requests_finished: int | None = None
    agents_admitted: int | None = None
    agents_queued: int | None = None


def ext(
    *,
    admitted: int = 10,
    queued: int = 0,
    generation_tokens: int = 100,
    prompt_tokens: int = 1000,
    interval_s: float | None = 1.0,
    finished: int = 10,
    running: int = 0,
) -> ExtSample:
    """A steady state: 10 requests of 100 prompt tokens + 10 output tokens finish per second
    (mean context 110 tokens; a 1000-token cache fits floor(0.9 * 1000 / 110) = 8 agents),
    prefilled from scratch (hit rate 0: prefill rate 1000 tokens/s)."""
    return ExtSample(
        time=0.0,
        kv_usage=0.5,
        prefix_hit_rate=0.0,
        prefix_queries=1000,
        prefix_hits=0,
        preemptions=0,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        running=running,
        waiting=0,
        waiting_capacity=0,
        kv_capacity_tokens=1000,
        interval_s=interval_s,
        requests_finished=finished,
        agents_admitted=admitted,
        agents_queued=queued,
    )


# -- ProbeLaw -----------------------------------------------------------------------------------


def test_probe_law_stays_free_while_over_subscription_is_cheap() -> None:
    law = ProbeLaw(probe_cost_s=1.0, rate_window_s=1.0)
    assert drive(law, [ext(admitted=15)] * 3) == [OPEN] * 3


def test_probe_law_rejects_a_zero_probe_cost() -> None:
    with pytest.raises(ConfigError, match="probe_cost_s"):
        ProbeLaw(probe_cost_s=0)

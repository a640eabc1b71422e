"""The default law (AdmitLaw) and its token budget, sample in / window out, one behaviour per
test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from concur_langgraph import (
    AdmitLaw,
    BatchProfile,
    ConcurLaw,
    ConfigError,
    ControlLaw,
    FixedLaw,
    Sample,
)
from concur_langgraph.core.window import OPEN
from concur_langgraph.laws.admit import TokenBudgetLaw


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


@pytest.mark.parametrize("law", [TokenBudgetLaw(), AdmitLaw(), ConcurLaw(), FixedLaw(2)])
def test_laws_follow_the_protocol(law: ControlLaw) -> None:
    assert isinstance(law, ControlLaw)


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


# -- TokenBudgetLaw -----------------------------------------------------------------------------


def test_budget_is_capacity_over_mean_context() -> None:
    law = TokenBudgetLaw(fill=0.9, ramp=100.0)
    assert law.next_window(1, ext()) == 8
    assert law.last_footprint == pytest.approx(110.0)


def test_budget_counts_admissions_before_any_request_finished() -> None:
    # First second of a batch: 10 requests admitted (running), 1000 prompt tokens queried.
    law = TokenBudgetLaw(fill=1.0, ramp=100.0)
    assert law.next_window(1, ext(finished=0, running=10, generation_tokens=0)) == 10


def test_budget_falls_back_to_the_cache_view_without_requests_finished() -> None:
    # 0.5 * 1000 tokens over 5 running requests: 100 tokens each.
    assert TokenBudgetLaw(fill=1.0, ramp=100.0).next_window(1, sample(running=5)) == 10


def test_budget_keeps_the_window_within_the_deadband() -> None:
    assert TokenBudgetLaw(fill=0.9, deadband=0.2).next_window(9, ext()) == 9


def test_budget_grows_at_most_by_the_ramp() -> None:
    assert TokenBudgetLaw(fill=0.9, ramp=1.5).next_window(4, ext()) == 6


def test_budget_shrinks_at_once() -> None:
    assert TokenBudgetLaw(fill=0.9).next_window(40, ext()) == 8


def test_budget_holds_while_the_footprint_is_unknown() -> None:
    assert TokenBudgetLaw().next_window(7, ext(finished=0, running=0)) == 7


# -- AdmitLaw -----------------------------------------------------------------------------------


def admit_law() -> AdmitLaw:
    # Undo cost of n agents beyond the budget of 8: n * 110 / 1000 s; bound 1 s -> n <= 9.
    return AdmitLaw(undo_cost_s=1.0, settle_s=1.0, measure_s=2.0, margin=0.05, backoff_s=3.0)


def test_admit_law_stays_free_while_cheap_to_undo() -> None:
    law = admit_law()
    assert drive(law, [ext(admitted=17)] * 3) == [OPEN] * 3
    assert law.phase == "free"


def test_admit_law_stays_free_until_a_prefill_completed() -> None:
    law = admit_law()
    assert law.next_window(OPEN, ext(admitted=100, prompt_tokens=0)) == OPEN


def test_admit_law_stays_free_on_the_first_sample_of_a_batch() -> None:
    # The first sample has no interval: no rate can be computed from it.
    assert admit_law().next_window(OPEN, ext(admitted=100, interval_s=None)) == OPEN


def test_admit_law_restricts_at_once_when_there_is_no_baseline() -> None:
    law = admit_law()
    assert law.next_window(OPEN, ext(admitted=30)) == 8
    assert law.phase == "restricted"


def test_admit_law_starts_a_trial_after_free_running() -> None:
    law = admit_law()
    windows = drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    assert windows == [OPEN, OPEN, 8]
    assert law.phase == "trial"


def test_admit_law_keeps_a_trial_that_pays() -> None:
    law = admit_law()
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    drained = ext(admitted=8, queued=22, generation_tokens=200)
    windows = drive(law, [drained] * 3, window=8)
    # Longer outputs (20 tokens) make a context of 120 tokens: the budget is now 7.
    assert windows[-1] == 7
    assert law.phase == "restricted"


def test_admit_law_drops_a_trial_that_does_not_pay() -> None:
    law = admit_law()
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    windows = drive(law, [ext(admitted=8, queued=22)] * 3, window=8)
    assert windows[-1] == OPEN
    assert law.phase == "free"


def test_admit_law_backs_off_after_a_failed_trial() -> None:
    law = admit_law()
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)] + [ext(admitted=8, queued=22)] * 3)
    assert law.phase == "free"  # the trial failed
    assert drive(law, [ext(admitted=30)] * 2, window=OPEN) == [OPEN, OPEN]


def test_admit_law_releases_when_admitting_everyone_is_cheap_again() -> None:
    law = admit_law()
    law.next_window(OPEN, ext(admitted=30))  # restricted
    # 8 admitted, 1 queued: everyone fits the budget plus one agent (0.11 s <= 0.5 s).
    assert law.next_window(8, ext(admitted=8, queued=1)) == OPEN
    assert law.phase == "free"


def test_admit_law_explains_each_phase_with_its_numbers() -> None:
    budget = "budget 8 agents (fill 0.9 of 1,000 KV tokens, 110 tokens per agent)"
    law = admit_law()
    law.next_window(OPEN, ext(admitted=100, prompt_tokens=0))
    assert law.explain(OPEN, ext()) == "AdmitLaw free: no prefill measured yet: open"
    law = admit_law()
    law.next_window(OPEN, ext(admitted=17))
    assert law.explain(OPEN, ext()) == (
        f"AdmitLaw free: 17 admitted, {budget}; undoing 9 agents costs 1.0 s of prefill at "
        "1,000 tok/s <= undo_cost_s 1.0: open"
    )
    law = admit_law()
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    assert law.explain(8, ext()) == (
        "AdmitLaw free -> trial: undoing 22 agents costs 2.4 s of prefill at 1,000 tok/s > "
        f"undo_cost_s 1.0; {budget}; trying 8 against the free goodput of 100 tok/s"
    )
    law = admit_law()
    law.next_window(OPEN, ext(admitted=30))
    assert law.explain(8, ext()).endswith(
        "no goodput baseline to trial against yet (under measure_s 2.0 s of running)"
    )
    law.next_window(8, ext(admitted=8, queued=1))
    assert law.explain(OPEN, ext()) == (
        f"AdmitLaw restricted -> free: 8 admitted + 1 queued, {budget}; undoing 1 agents costs "
        "0.1 s of prefill at 1,000 tok/s <= undo_cost_s / 2: open"
    )


def test_admit_law_trial_waits_for_the_admitted_agents_to_drain() -> None:
    law = admit_law()
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    # 30 agents still admitted for a window of 8: no measurement yet, however long.
    drive(law, [ext(admitted=30, generation_tokens=1)] * 10, window=8)
    assert law.phase == "trial"


def test_admit_law_trial_measures_after_max_settle_even_if_not_drained() -> None:
    law = AdmitLaw(undo_cost_s=1.0, settle_s=1.0, max_settle_s=3.0, measure_s=2.0)
    drive(law, [ext(admitted=15)] * 2 + [ext(admitted=30)])
    drive(law, [ext(admitted=30, generation_tokens=1)] * 5, window=8)  # 3 s settle + 2 s
    assert law.phase == "free"


def test_admit_law_restricted_window_grows_by_the_ramp() -> None:
    law = AdmitLaw(undo_cost_s=1.0, ramp=1.5)
    law.next_window(OPEN, ext(admitted=30))  # restricted, budget 8
    assert law.next_window(2, ext(admitted=30, queued=20)) == 3


def test_admit_law_undo_cost_is_excess_times_context_over_rate() -> None:
    law = admit_law()
    law.next_window(OPEN, ext(admitted=8))
    assert law.undo_cost(10) == pytest.approx(10 * 110 / 1000)


@pytest.mark.parametrize(
    ("field", "value"), [("fill", 0), ("measure_s", 0), ("ramp", 1.0), ("undo_cost_s", -1)]
)
def test_admit_law_rejects_bad_constants(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        AdmitLaw(**{field: value})  # type: ignore[arg-type]


# -- AdmitLaw: profile and warm start -------------------------------------------------------------


def profile(**change: Any) -> BatchProfile:
    # ext()'s steady state: 110 tokens per call, 1000 tokens/s of prefill, a 1000-token cache:
    # a budget of floor(0.9 * 1000 / 110) = 8 agents, 0.11 s of prefill to undo each beyond it.
    values: dict[str, Any] = {
        "context_per_call": 110.0,
        "prefill_rate": 1000.0,
        "kv_capacity_tokens": 1000,
        "agents": 30,
    }
    return BatchProfile(**(values | change))


def test_admit_law_measures_the_profile_of_its_batch() -> None:
    law = admit_law()
    assert law.profile() is None  # nothing measured yet
    drive(law, [ext(admitted=15, queued=3)] * 3)
    assert law.profile() == profile(agents=18)


def test_admit_law_has_no_profile_without_requests_finished() -> None:
    law = admit_law()
    drive(law, [sample()] * 3)
    assert law.profile() is None


def test_a_warm_profile_starts_the_batch_at_its_budget_and_keeps_it() -> None:
    # 22 agents beyond the budget of 8 cost 22 * 0.11 = 2.42 s to undo: more than the 1 s bound.
    law = AdmitLaw(undo_cost_s=1.0, warm=profile())
    assert law.start_window == 8
    assert drive(law, [ext(admitted=8, queued=22)] * 3, window=8) == [8, 8, 8]
    assert law.phase == "free" and law.start_window == 8


def test_a_warm_profile_of_a_batch_cheap_to_undo_starts_open() -> None:
    # 12 agents: 4 beyond the budget cost 0.44 s to undo, within the bound.
    law = AdmitLaw(undo_cost_s=1.0, warm=profile(agents=12))
    assert law.start_window is None
    assert drive(law, [ext(admitted=12)] * 2) == [OPEN, OPEN]


def test_the_warm_start_counts_the_agents_of_this_batch() -> None:
    # The profile's batch was small, this one is not: the law caps once it sees 30 agents,
    # while without a profile the 12 admitted are cheap to undo and the queue walks in.
    law, plain = AdmitLaw(undo_cost_s=1.0, warm=profile(agents=12)), AdmitLaw(undo_cost_s=1.0)
    arriving = [ext(admitted=12), ext(admitted=12, queued=18)]
    assert drive(law, arriving, window=OPEN) == [OPEN, 8]
    assert drive(plain, arriving, window=OPEN) == [OPEN, OPEN]


def test_a_profile_from_another_kv_capacity_is_not_used() -> None:
    law = AdmitLaw(undo_cost_s=1.0, warm=profile(kv_capacity_tokens=2000))
    assert law.start_window == 16  # judged with the profile's own capacity before a sample
    assert law.next_window(16, ext(admitted=16, queued=14)) == OPEN
    assert law.warm is None and law.start_window is None


def test_warm_must_be_a_profile() -> None:
    with pytest.raises(ConfigError, match="warm: expected a BatchProfile or None"):
        AdmitLaw(warm={"context_per_call": 110})  # type: ignore[arg-type]

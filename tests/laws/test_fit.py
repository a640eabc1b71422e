"""FitLaw on scripted samples: each decision from exact per-agent accounts, in virtual time."""

from __future__ import annotations

from typing import Any

import pytest

from concur_langgraph import AgentAccount, ConfigError, FitLaw, Sample
from concur_langgraph.laws.fit import agent_growth, fit_window

CAPACITY = 10_000


def account(
    i: int,
    context: int,
    *,
    steps: int = 2,
    first: int | None = None,
    state: str = "active",
    in_call: bool = True,
) -> AgentAccount:
    return AgentAccount(
        agent_id=f"a{i}",
        state=state,
        context=context,
        generated=10 * steps,
        steps=steps,
        first_context=context - 500 * (steps - 1) if first is None else first,
        in_call=in_call,
        order=i,
    )


def sample(agents: list[AgentAccount], *, prompt_tokens: int = 20_000, **kw: Any) -> Sample:
    fields: dict[str, Any] = {
        "time": 0.0,
        "kv_usage": 0.9,
        "prefix_hit_rate": 0.5,
        "prefix_queries": 100,
        "prefix_hits": 50,
        "preemptions": 0,
        "prompt_tokens": prompt_tokens,  # 10,000 tokens/s of prefill measured
        "generation_tokens": 100,
        "running": 4,
        "waiting": 0,
        "waiting_capacity": 0,
        "kv_capacity_tokens": CAPACITY,
        "interval_s": 1.0,
        "agents": tuple(agents),
    }
    fields.update(kw)
    return Sample(**fields)


def test_growth_is_the_median_per_step_growth_of_agents_with_two_steps() -> None:
    agents = [account(0, 2000, steps=3, first=1000), account(1, 1600, steps=2, first=1000)]
    assert agent_growth(agents) == (500 + 600) / 2
    assert agent_growth([account(0, 900, steps=1, first=900)]) == 0.0


def test_fit_counts_agents_in_admission_order_projected_one_step() -> None:
    agents = [account(i, 2000) for i in range(6)]  # growth 500: each takes 2,500
    assert fit_window(agents, 9_000) == (3, 7_500.0)
    assert fit_window(agents, 100) == (1, 2_500.0)  # the first agent always fits
    # An agent that never called is sized like the others' first context (1,500) + growth.
    fresh = AgentAccount(
        agent_id="n", state="waiting", context=0, generated=0, steps=0, first_context=0,
        in_call=False, order=9,
    )  # fmt: skip
    assert fit_window([*agents[:2], fresh], 7_000) == (3, 7_000.0)
    assert fit_window([fresh], 1_000) is None  # no size known yet


def test_restricts_to_the_fit_when_undoing_the_rest_would_cost_more_than_undo_cost_s() -> None:
    law = FitLaw(undo_cost_s=0.5)
    agents = [account(i, 2000) for i in range(8)]  # 3 fit 0.9 x 10,000 at 2,500 each
    assert law.next_window(8, sample(agents)) == 3
    assert law.explain(8, sample(agents)).startswith(
        "FitLaw: 3 of 8 agents fit 0.9 of 10,000 KV tokens (7,500 tokens projected one step "
        "ahead); recomputing the 12,500 tokens beyond it takes 1.2 s: shrink to 3"
    )


def test_stays_open_when_the_agents_beyond_the_fit_are_cheap_to_recompute() -> None:
    law = FitLaw()  # undo_cost_s 5: 12,500 tokens at 10,000 tokens/s is 1.25 s
    assert law.next_window(8, sample([account(i, 2000) for i in range(8)])) == 8
    assert "<= undo_cost_s 5.0: open" in law.explain(8, sample([]))


def test_a_restriction_is_lifted_only_at_reopen_times_undo_cost_s() -> None:
    # Each agent takes 2,500 tokens one step ahead; 3 fit 0.9 x 10,000; prefill 10,000 tokens/s.
    law = FitLaw(undo_cost_s=1.0)
    agents = [account(i, 2000) for i in range(8)]
    assert law.next_window(8, sample(agents)) == 3  # 5 beyond: 12,500 tokens, 1.25 s > 1.0
    # Two finished: 3 beyond, 0.75 s. Under undo_cost_s, but a restriction holds until
    # reopen x undo_cost_s (0.5 s): the window stays at the fit.
    assert law.next_window(3, sample(agents[:6])) == 3
    assert law.explain(3, sample([])).endswith(
        "recomputing the 7,500 tokens beyond it takes 0.8 s: window 3"
    )
    assert law.next_window(3, sample(agents[:4])) == 4  # 1 beyond: 0.25 s <= 0.5
    assert law.explain(4, sample([])).endswith(
        "recomputing the 2,500 tokens beyond it takes 0.2 s <= reopen x undo_cost_s 0.5: open"
    )
    # Open again, the next restriction needs undo_cost_s itself: 0.75 s stays open.
    assert law.next_window(6, sample(agents[:6])) == 6
    assert law.explain(6, sample([])).endswith("<= undo_cost_s 1.0: open")


def test_reopen_one_lifts_a_restriction_at_undo_cost_s() -> None:
    law = FitLaw(undo_cost_s=1.0, reopen=1.0)
    agents = [account(i, 2000) for i in range(8)]
    assert law.next_window(8, sample(agents)) == 3
    assert law.next_window(3, sample(agents[:6])) == 6


def test_stays_open_while_the_agents_are_mostly_in_tools() -> None:
    law = FitLaw(undo_cost_s=0.5)
    idle = [account(i, 2000, in_call=i < 2) for i in range(8)]  # 2 of 8 in the engine
    assert law.next_window(8, sample(idle)) == 8
    assert "0.25 of the admitted agents are in the engine (< busy_min 0.5)" in law.explain(
        8, sample(idle)
    )


def test_opens_when_everyone_fits_and_holds_without_accounting() -> None:
    law = FitLaw(undo_cost_s=0.5)
    small = [account(i, 700) for i in range(4)]
    assert law.next_window(2, sample(small)) == 4
    assert law.next_window(5, sample([])) == 5
    assert law.explain(5, sample([])).endswith("hold")


def test_shrinks_only_past_the_high_line_and_grows_at_once() -> None:
    law = FitLaw(undo_cost_s=0.5, fill=0.6, high=0.9)
    agents = [account(i, 2000) for i in range(8)]
    # fill 0.6: 2 fit; high 0.9: 3 fit. A window of 3 is held, a window of 4 shrinks to 2.
    assert law.next_window(3, sample(agents)) == 3
    assert law.explain(3, sample(agents)).endswith("hold")
    assert law.next_window(4, sample(agents)) == 2
    assert law.next_window(1, sample(agents)) == 2


def test_an_agent_whose_context_outgrows_the_budget_alone_keeps_a_window_of_one() -> None:
    law = FitLaw(undo_cost_s=0.0)
    giant = [account(0, 20_000), account(1, 2000), account(2, 2000)]
    assert law.next_window(3, sample(giant)) == 1


def test_needs_a_measured_prefill_rate_before_it_restricts() -> None:
    law = FitLaw(undo_cost_s=0.5)
    agents = [account(i, 2000) for i in range(8)]
    assert law.next_window(8, sample(agents, prompt_tokens=0)) == 8
    assert "prefill rate not measured yet: open" in law.explain(8, sample(agents))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fill", 0, r"^fill: must be a number > 0"),
        ("high", 0.5, r"^high: must be a number >= fill \(0.9\)"),
        ("busy_min", 1.5, r"^busy_min: must be a number >= 0 and <= 1"),
        ("undo_cost_s", -1, r"^undo_cost_s: must be a number >= 0"),
        ("reopen", 1.5, r"^reopen: must be a number >= 0 and <= 1"),
        ("lookahead", "forever", r"^lookahead: must be 'step' or 'lindy'"),
    ],
)
def test_bad_constants_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FitLaw(**{field: value})  # type: ignore[arg-type]

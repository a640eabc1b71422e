"""The lab's FitLaw variant and victim/resume window (benchmarks/lab_laws.py): scripted cases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lab_laws import KeepLargestFitLaw, NewcomerFitLaw, PolicyWindow, SharedPrefixFitLaw

from concur_langgraph import AgentAccount, ConfigError, FitLaw, Sample


def account(
    i: int, context: int, *, steps: int = 2, first: int | None = None, state: str = "active"
) -> AgentAccount:
    return AgentAccount(
        agent_id=f"a{i}",
        state=state,
        context=context,
        generated=10 * steps,
        steps=steps,
        first_context=context - 500 * (steps - 1) if first is None else first,
        in_call=True,
        order=i,
    )


def sample(agents: list[AgentAccount], **kw: Any) -> Sample:
    fields: dict[str, Any] = {
        "time": 0.0,
        "kv_usage": 0.9,
        "prefix_hit_rate": 0.5,
        "prefix_queries": 100,
        "prefix_hits": 50,
        "preemptions": 0,
        "prompt_tokens": 20_000,  # 10,000 tokens/s of prefill measured
        "generation_tokens": 100,
        "running": 4,
        "waiting": 0,
        "waiting_capacity": 0,
        "kv_capacity_tokens": 10_000,
        "interval_s": 1.0,
        "agents": tuple(agents),
    }
    fields.update(kw)
    return Sample(**fields)


# Two old agents (3,000 tokens, 5 steps) hold slots; two parked young ones (1,000 tokens,
# 1 step) wait. Growth: the old agents' 500 per step. Active mean context: 3,000.
OLD_AND_YOUNG = [
    account(0, 3000, steps=5),
    account(1, 3000, steps=5),
    account(2, 1000, steps=1, first=1000, state="parked"),
    account(3, 1000, steps=1, first=1000, state="parked"),
]


def test_fitlaw_sizes_the_young_agents_at_their_own_context() -> None:
    # 3,500 + 3,500 + 1,500 = 8,500 <= 9,000: three fit.
    law = FitLaw(undo_cost_s=0.0)
    assert law.next_window(2, sample(OLD_AND_YOUNG)) == 3


@pytest.mark.parametrize("newcomer", ["young", "outside", "floor"])
def test_newcomer_sizing_counts_the_young_agents_at_the_active_mean(newcomer: str) -> None:
    # Each young agent counts 3,000 + 500: 3,500 x 2 = 7,000, a third would pass 9,000.
    law = NewcomerFitLaw(undo_cost_s=0.0, newcomer=newcomer)  # type: ignore[arg-type]
    assert law.next_window(2, sample(OLD_AND_YOUNG)) == 2
    assert law.explain(2, sample([])).startswith(
        "FitLaw: 2 of 4 agents fit 0.9 of 10,000 KV tokens (7,000 tokens projected"
    )


def test_mean_sizing_only_touches_agents_that_never_called() -> None:
    law = NewcomerFitLaw(undo_cost_s=0.0, newcomer="mean")
    assert law.next_window(2, sample(OLD_AND_YOUNG)) == 3  # as FitLaw: they called once
    fresh = AgentAccount(
        agent_id="n", state="waiting", context=0, generated=0, steps=0, first_context=0,
        in_call=False, order=9,
    )  # fmt: skip
    # FitLaw sizes it at the mean first context (1,000) + 500: 3 fit; here 3,000 + 500: 2.
    assert FitLaw(undo_cost_s=0.0).next_window(2, sample([*OLD_AND_YOUNG[:2], fresh])) == 3
    assert law.next_window(2, sample([*OLD_AND_YOUNG[:2], fresh])) == 2


def test_newcomer_names_the_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"^newcomer: must be 'mean', 'young'"):
        NewcomerFitLaw(newcomer="all")  # type: ignore[arg-type]


def test_keep_largest_counts_the_admitted_agents_largest_first() -> None:
    # Growth 500. Admission order: 1,500 + 1,500 + 5,500 = 8,500 <= 9,000: 3 fit.
    # Largest first: 5,500 + 5,500 > 9,000: only the first (a window is at least 1).
    agents = [account(0, 1000), account(1, 1000), account(2, 5000), account(3, 5000)]
    assert FitLaw(undo_cost_s=0.0).next_window(4, sample(agents)) == 3
    assert KeepLargestFitLaw(undo_cost_s=0.0).next_window(4, sample(agents)) == 1


def test_shared_prefix_is_counted_once() -> None:
    # Every agent: 2,000 tokens, first context 1,500 (the estimate of the shared prefix).
    # FitLaw: 2,500 each, 3 fit 9,000. Shared once: 9,000 - 1,500 = 7,500 for 1,000 each: 7.
    agents = [account(i, 2000) for i in range(8)]
    assert FitLaw(undo_cost_s=0.0).next_window(1, sample(agents)) == 3
    assert SharedPrefixFitLaw(undo_cost_s=0.0).next_window(1, sample(agents)) == 7
    assert SharedPrefixFitLaw(undo_cost_s=0.0, share=0.0).next_window(1, sample(agents)) == 3


def window(victim: str = "newest", resume: str = "fifo", **sizes: int) -> PolicyWindow:
    return PolicyWindow(
        3,
        size=lambda agent_id: sizes.get(agent_id, 0),
        budget_tokens=1000,
        victim=victim,  # type: ignore[arg-type]
        resume=resume,  # type: ignore[arg-type]
    )


async def test_smallest_first_parks_the_holders_with_the_smallest_contexts() -> None:
    for victim, parks in (("newest", {"c"}), ("smallest", {"b"})):
        w = window(victim, a=100, b=50, c=300)
        permits = {name: await w.acquire(name) for name in "abc"}
        await w.set_limit(2)
        assert {name for name, p in permits.items() if w.must_park(p)} == parks


async def test_bfd_resumes_the_largest_parked_agent_that_fits_the_free_tokens() -> None:
    w = window(resume="bfd", h1=300, h2=200, x=700, y=400, z=200)
    held = [await w.acquire("h1"), await w.acquire("h2"), await w.acquire("h3")]
    waiters = {n: asyncio.create_task(w.acquire(n, parked=True)) for n in ("x", "y", "z")}
    await asyncio.sleep(0)
    # h3 (no context yet) leaves: 1,000 - 500 free = 500: y (400) is the largest that fits.
    await w.release(held[2])
    await asyncio.sleep(0)
    assert [n for n, t in waiters.items() if t.done()] == ["y"]
    # h2 leaves: 1,000 - 700 = 300 free: z (200) fits, x (700) does not: z.
    await w.release(held[1])
    await asyncio.sleep(0)
    assert sorted(n for n, t in waiters.items() if t.done()) == ["y", "z"]
    # h1 leaves: 1,000 - 600 = 400 free, x (700) does not fit but is the only one: x.
    await w.release(held[0])
    await asyncio.sleep(0)
    assert all(t.done() for t in waiters.values())


async def test_fifo_resumes_in_the_order_they_parked() -> None:
    w = window(x=700, y=400)
    held = [await w.acquire(n) for n in ("h1", "h2", "h3")]
    waiters = {n: asyncio.create_task(w.acquire(n, parked=True)) for n in ("x", "y")}
    await asyncio.sleep(0)
    await w.release(held[0])
    await asyncio.sleep(0)
    assert [n for n, t in waiters.items() if t.done()] == ["x"]
    await w.release(held[1])
    await asyncio.sleep(0)
    assert all(t.done() for t in waiters.values())


def test_policy_window_names_a_bad_choice() -> None:
    with pytest.raises(ConfigError, match=r"^victim: must be 'newest' or 'smallest'"):
        window(victim="largest")
    with pytest.raises(ConfigError, match=r"^resume: must be 'fifo' or 'bfd'"):
        window(resume="lifo")

"""Gate: fast path, parking victims, resumption order, release, timeouts, rate cap."""

from __future__ import annotations

import asyncio

import pytest

from concur_langgraph import AdmissionTimeoutError, ConcurError, ConfigError, Gate, LocalWindow


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fast_path_awaits_nothing() -> None:
    gate = Gate(LocalWindow(2))
    await gate.before_llm_call("a")
    coro = gate.before_llm_call("a")
    with pytest.raises(StopIteration):
        coro.send(None)  # completed without suspending: no trip through the event loop
    assert gate.statistics().llm_calls == 2


async def test_agent_keeps_its_slot_across_calls_and_others_wait() -> None:
    window = LocalWindow(1)
    gate = Gate(window)
    await gate.before_llm_call("a")
    b = asyncio.create_task(gate.before_llm_call("b"))
    await settle()
    await gate.before_llm_call("a")  # second step of a: no wait
    assert not b.done()
    stats = gate.statistics()
    assert (stats.active, stats.waiting, stats.parked) == (1, 1, 0)
    await gate.release("a")
    await settle()
    assert b.done() and gate.holds("b")
    assert gate.statistics().completed == 1


async def test_shrink_parks_most_recent_at_next_call_and_resumes_first() -> None:
    window = LocalWindow(3)
    gate = Gate(window)
    for name in ("old", "mid", "new"):
        await gate.before_llm_call(name)
    fresh = asyncio.create_task(gate.before_llm_call("fresh"))
    await settle()
    await window.set_limit(2)
    await gate.before_llm_call("old")  # not a victim: proceeds
    parked = asyncio.create_task(gate.before_llm_call("new"))  # the victim parks here
    await settle()
    assert not parked.done()
    stats = gate.statistics()
    assert (stats.active, stats.parked, stats.waiting, stats.parks_total) == (2, 1, 1, 1)
    await gate.release("mid")
    await settle()
    # The parked agent resumes before the never-admitted one.
    assert parked.done() and not fresh.done()
    await gate.release("old")
    await settle()
    assert fresh.done()


async def test_parallel_calls_of_one_agent_take_one_slot() -> None:
    window = LocalWindow(1)
    gate = Gate(window)
    await gate.before_llm_call("holder")
    calls = [asyncio.create_task(gate.before_llm_call("fan")) for _ in range(3)]
    await settle()
    await gate.release("holder")
    await settle()
    assert all(c.done() for c in calls)
    assert window.statistics().holders == 1


async def test_release_is_idempotent_and_ignores_unknown_agents() -> None:
    window = LocalWindow(1)
    gate = Gate(window)
    await gate.before_llm_call("a")
    await gate.release("a")
    await gate.release("a")
    await gate.release("never-seen")
    assert window.statistics().holders == 0
    assert gate.statistics().completed == 1


async def test_cancelled_waiter_leaves_no_slot_behind() -> None:
    window = LocalWindow(1)
    gate = Gate(window)
    await gate.before_llm_call("a")
    waiting = asyncio.create_task(gate.before_llm_call("b"))
    await settle()
    waiting.cancel()
    await settle()
    await gate.release("b")  # what an integration does on the cancelled root run
    await gate.release("a")
    assert window.statistics().holders == 0


async def test_release_during_wait_does_not_leak_the_later_grant() -> None:
    window = LocalWindow(1)
    gate = Gate(window)
    await gate.before_llm_call("a")
    waiting = asyncio.create_task(gate.before_llm_call("b"))
    await settle()
    await gate.release("b")  # b's run ended while its call still waited
    await gate.release("a")
    await settle()
    with pytest.raises(ConcurError, match="released while one of its LLM calls waited"):
        waiting.result()
    assert window.statistics().holders == 0


async def test_admission_timeout_names_agent_and_option() -> None:
    gate = Gate(LocalWindow(1), admission_timeout_s=0.01)
    await gate.before_llm_call("a")
    with pytest.raises(AdmissionTimeoutError, match=r"'b'.*admission_timeout_s=0.01"):
        await gate.before_llm_call("b")
    assert gate.window.statistics().waiting_new == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_rps": 0}, "max_rps"),
        ({"max_rps": True}, "max_rps"),
        ({"admission_timeout_s": -1}, "admission_timeout_s"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Gate(LocalWindow(1), **kwargs)  # type: ignore[arg-type]

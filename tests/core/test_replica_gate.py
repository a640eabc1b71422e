"""ReplicaGate: placement at admission, stickiness, parked agents first, a replica's death.

Exact outcomes in virtual time on in-process windows; the HTTP side (routing, a simulated
replica that dies) is in tests/integrations/test_replicas.py.
"""

from __future__ import annotations

import asyncio

import pytest

from concur_langgraph.core.gate import Gate
from concur_langgraph.core.replicas import ReplicaError, ReplicaGate, find_replica_gate
from concur_langgraph.core.window import OPEN, LocalWindow
from concur_langgraph.errors import ConfigError
from concur_langgraph.testing.vtime_fixtures import virtual_time

pytestmark = virtual_time

URLS = ("http://r0", "http://r1", "http://r2")


def replicas(*limits: int) -> ReplicaGate:
    return ReplicaGate(URLS[: len(limits)], [Gate(LocalWindow(k)) for k in limits])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def window(gate: ReplicaGate, index: int) -> LocalWindow:
    w = gate.gates[index].window
    assert isinstance(w, LocalWindow)
    return w


async def test_agents_go_to_the_replica_with_the_most_free_slots_then_wait_for_any() -> None:
    gate = replicas(2, 1)
    for agent in "abc":
        await gate.before_llm_call(agent)
    # a: 2 vs 1 free -> r0; b: 1 vs 1, fewer placed on r1 -> r1; c: r0's last slot.
    assert [gate.replica_of(a) for a in "abc"] == [0, 1, 0]
    d = asyncio.create_task(gate.before_llm_call("d"))
    await settle()
    assert not d.done() and gate.replica_of("d") is None
    assert gate.statistics().waiting == 1
    await gate.release("b")  # r1 frees first: d goes there, not into r0's queue
    await d
    assert gate.replica_of("d") == 1 and gate.holds("d")
    assert [r.placed_total for r in gate.replica_statistics()] == [2, 2]


async def test_an_agent_stays_on_its_replica_whatever_the_others_offer() -> None:
    gate = replicas(1, 4)
    await gate.before_llm_call("a")
    assert gate.replica_of("a") == 1
    await window(gate, 0).set_limit(100)
    for _ in range(3):
        await gate.before_llm_call("a")
        gate.after_llm_call("a", 100, 10)
    assert gate.replica_of("a") == 1
    assert await gate.route("a") == "http://r1"
    assert gate.gates[1].statistics().tokens_active == 110
    assert gate.gates[0].statistics().active == 0


async def test_a_parked_agent_resumes_on_its_replica_before_new_agents_are_placed() -> None:
    gate = replicas(2, 1)
    for agent in "abc":
        await gate.before_llm_call(agent)
    assert gate.replica_of("c") == 0
    await window(gate, 0).set_limit(1)  # c (newest on r0) must park at its next call
    parked = asyncio.create_task(gate.before_llm_call("c"))
    new = asyncio.create_task(gate.before_llm_call("d"))
    await settle()
    assert not parked.done() and not new.done()
    await gate.release("a")  # r0 frees a slot: its own parked agent takes it
    await settle()
    assert parked.done() and gate.replica_of("c") == 0 and gate.holds("c")
    assert not new.done()
    gate.gates[0].window.set_limit_nowait(2)  # type: ignore[attr-defined]
    gate.window_changed()
    await new
    assert gate.replica_of("d") == 0


async def test_a_window_that_grows_places_the_waiting_agents() -> None:
    gate = replicas(1, 1)
    await gate.before_llm_call("a")
    await gate.before_llm_call("b")
    waiting = [asyncio.create_task(gate.before_llm_call(x)) for x in "cde"]
    await settle()
    assert not any(t.done() for t in waiting)
    window(gate, 1).set_limit_nowait(3)
    gate.window_changed()
    await asyncio.gather(*waiting[:2])
    assert [gate.replica_of(x) for x in "cd"] == [1, 1]
    await settle()
    assert not waiting[2].done()  # no room anywhere: one pass does not over-place
    waiting[2].cancel()
    await settle()
    assert gate.statistics().waiting == 0 and gate.replica_of("e") is None


async def test_a_dead_replicas_agents_move_with_their_accounts_and_nothing_is_lost() -> None:
    gate = replicas(2, 2, 2)
    for agent in "abcdef":
        await gate.before_llm_call(agent)
        gate.after_llm_call(agent, 1000, 50)
    on_r1 = [a for a in "abcdef" if gate.replica_of(a) == 1]
    assert on_r1 == ["b", "e"]
    # r1's window shrinks and e parks; then r1 dies: e, waiting there, is woken and placed
    # again; b, in a tool call, moves at its next call; r0 and r2 have no room: they queue.
    window(gate, 1).set_limit_nowait(1)
    parked = asyncio.create_task(gate.before_llm_call("e"))
    await settle()
    assert not parked.done()
    died: list[int] = []

    async def on_dead(index: int) -> None:
        died.append(index)

    gate.on_dead = on_dead
    assert await gate.mark_dead(1, reason="test")
    assert not await gate.mark_dead(1)
    assert died == [1]
    await settle()
    assert not parked.done() and gate.replica_of("e") is None
    await gate.release("a")  # r0 frees a slot: e (moved, sunk work) is placed there
    await parked
    assert gate.replica_of("e") == 0
    account = next(x for x in gate.gates[0].accounting() if x.agent_id == "e")
    assert (account.context, account.steps, account.generated) == (1050, 1, 50)
    b = asyncio.create_task(gate.before_llm_call("b"))
    await settle()
    assert not b.done()
    await gate.release("c")
    await b
    assert gate.replica_of("b") == 2
    stats = gate.statistics()
    assert stats.completed == 2 and stats.active == 4  # b, d, e and f: nothing dropped
    assert {a for a in "bdef" if gate.holds(a)} == set("bdef")
    assert gate.window.limit == 4  # the dead replica's window no longer counts


async def test_a_call_in_flight_on_a_dead_replica_is_routed_to_a_live_one_at_once() -> None:
    gate = replicas(1, 1)
    await gate.before_llm_call("a")
    await gate.before_llm_call("b")
    assert await gate.route("b") == "http://r1"
    await gate.mark_dead(1)
    # b's retry must go somewhere now, though r0 is full: routed there, admitted at its next
    # call as a parked agent (ahead of new ones).
    assert await gate.route("b") == "http://r0"
    assert gate.replica_of("b") == 0
    new = asyncio.create_task(gate.before_llm_call("c"))
    moved = asyncio.create_task(gate.before_llm_call("b"))
    await settle()
    assert not moved.done() and not new.done()
    await gate.release("a")
    await moved
    assert gate.holds("b") and not new.done()
    assert gate.gates[1].statistics().completed == 0  # moving is not finishing
    await gate.release("b")
    await new
    assert gate.replica_of("c") == 0


async def test_with_every_replica_dead_calls_fail_clearly() -> None:
    gate = replicas(1, 1)
    await gate.before_llm_call("a")
    await gate.before_llm_call("b")
    waiting = asyncio.create_task(gate.before_llm_call("c"))
    await settle()
    await gate.mark_dead(0)
    await gate.mark_dead(1)
    with pytest.raises(ReplicaError, match="every replica is dead"):
        await waiting
    with pytest.raises(ReplicaError, match="every replica is dead"):
        await gate.route("a")
    with pytest.raises(ReplicaError, match="every replica is dead"):
        await gate.before_llm_call("d")


async def test_the_transport_finds_the_gate_by_its_agent_and_requests_of_others_pass() -> None:
    gate = replicas(2, 2)
    await gate.before_llm_call("x-agent")
    assert find_replica_gate("x-agent") is gate
    assert find_replica_gate("nobody") is None
    assert await gate.route(None) is None and await gate.route("nobody") is None
    await gate.release("x-agent")
    assert find_replica_gate("x-agent") is None


async def test_a_dead_replicas_window_admits_everyone_it_held() -> None:
    gate = replicas(1, 1)
    await gate.before_llm_call("a")
    await gate.mark_dead(0)
    assert window(gate, 0).limit == OPEN
    await gate.before_llm_call("a")  # leaves r0, placed again on r1
    assert gate.replica_of("a") == 1


async def test_one_gate_per_url() -> None:
    with pytest.raises(ConfigError, match="one gate per URL"):
        ReplicaGate(URLS, [Gate(LocalWindow(1))])


async def test_a_parked_agent_moves_once_to_a_replica_with_room() -> None:
    gate = replicas(2, 1)
    for agent in "abc":
        await gate.before_llm_call(agent)
        gate.after_llm_call(agent, 500, 20)
    assert [gate.replica_of(a) for a in "abc"] == [0, 1, 0]
    window(gate, 0).set_limit_nowait(1)
    c = asyncio.create_task(gate.before_llm_call("c"))  # r0 is over its window: c parks
    await settle()
    assert not c.done() and gate.gates[0].waiting_to_resume() == ["c"]
    await gate.release("b")  # r1 has room and nobody of its own waiting: c moves there
    await c
    assert gate.replica_of("c") == 1 and gate.holds("c") and gate.moves_total == 1
    account = next(x for x in gate.gates[1].accounting() if x.agent_id == "c")
    assert (account.context, account.steps) == (520, 1)
    assert gate.gates[0].statistics().completed == 0  # moving is not finishing
    assert gate.statistics().llm_calls == 4  # c's call counted once


async def test_moving_an_agent_its_run_cancelled_keeps_the_cancellation() -> None:
    gate = replicas(2, 1)
    for agent in "abc":
        await gate.before_llm_call(agent)
    window(gate, 0).set_limit_nowait(1)
    c = asyncio.create_task(gate.before_llm_call("c"))
    await settle()
    c.cancel()  # the run is cancelled, and in the same instant a slot frees on r1
    await gate.release("b")
    with pytest.raises(asyncio.CancelledError):
        await c
    assert gate.replica_of("c") == 0 and not gate.holds("c")

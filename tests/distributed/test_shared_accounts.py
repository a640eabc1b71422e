"""Every worker's agent accounts reach the leader's law on a shared window (``FitLaw`` there).

Two sessions of one batch in this process, on a real Redis, each with its own gate; a scripted
signal source and a law that records what it is shown. Checked: the leader's law sees every
worker's agents, holders in their global admission order with their exact contexts; a worker
that leaves takes its agents with it; a worker that dies (stops writing) is forgotten when its
entry expires; and the merge and the wire format on their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis_asyncio

from concur_langgraph import AgentAccount, ConcurSession, Sample, SessionOptions
from concur_langgraph.core.law import LawDefaults
from concur_langgraph.distributed.accounts import decode, encode, merge_accounts
from concur_langgraph.distributed.keys import batch_key

INTERVAL_S = 0.05
DEADLINE_S = 10.0  # a bound on a hang, not a measurement


class Source:
    """Signals of an idle server with a known KV capacity."""

    async def start(self) -> None:
        return None

    async def sample(self, now: float) -> Sample:
        return Sample(
            time=now,
            kv_usage=0.1,
            prefix_hit_rate=0.9,
            prefix_queries=100,
            prefix_hits=90,
            preemptions=0,
            prompt_tokens=0,
            generation_tokens=0,
            running=0,
            waiting=0,
            waiting_capacity=0,
            kv_capacity_tokens=10_000,
            interval_s=INTERVAL_S,
        )

    async def aclose(self) -> None:
        return None


@dataclass
class Recorder(LawDefaults):
    """Keeps the window; remembers the agents of every sample it is shown."""

    seen: list[tuple[tuple[str, int, str], ...]] = field(default_factory=list)
    starts_open = True

    def next_window(self, window: int, sample: Sample) -> int:
        self.seen.append(tuple((a.agent_id, a.context, a.state) for a in sample.agents or ()))
        return window


def options(redis_url: str, batch_id: str, law: Any) -> SessionOptions:
    return SessionOptions(
        source=Source(), redis_url=redis_url, batch_id=batch_id, interval_s=INTERVAL_S, law=law
    )


async def until(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")
        await asyncio.sleep(0.02)


async def call(session: ConcurSession, agent: str, prompt: int, completion: int) -> None:
    await session.gate.before_llm_call(agent)
    session.gate.after_llm_call(agent, prompt, completion)


async def test_the_leaders_law_sees_every_workers_agents_in_admission_order(
    redis_url: str, batch_id: str
) -> None:
    law = Recorder()
    leader = ConcurSession(options(redis_url, batch_id, law))
    other = ConcurSession(options(redis_url, batch_id, Recorder()))
    async with leader:
        assert leader.statistics().leader
        async with other:
            assert not other.statistics().leader
            await call(leader, "a1", 100, 10)
            await call(other, "b1", 200, 20)  # admitted second: the batch's order, not a gate's
            await call(leader, "a2", 300, 30)
            both = (("a1", 110, "active"), ("b1", 220, "active"), ("a2", 330, "active"))
            await until(lambda: bool(law.seen) and law.seen[-1] == both, "all three agents")
            await other.gate.release("b1")
        # The worker left: its entry went with it.
        await until(
            lambda: law.seen[-1] == (("a1", 110, "active"), ("a2", 330, "active")),
            "the other worker's agents to go",
        )


async def test_a_worker_that_stops_writing_is_forgotten_when_its_entry_expires(
    redis_url: str, batch_id: str
) -> None:
    law = Recorder()
    client = redis_asyncio.Redis.from_url(redis_url)
    ghost = AgentAccount(
        agent_id="ghost", state="active", context=5, generated=1, steps=1, first_context=5,
        in_call=False, order=0,
    )  # fmt: skip
    try:
        async with ConcurSession(options(redis_url, batch_id, law)) as session:
            await call(session, "a1", 100, 10)
            # A dead worker's last write: no one renews it.
            await client.set(batch_key(batch_id, "acct:dead"), encode([ghost]), px=300)
            await client.sadd(batch_key(batch_id, "acct"), "dead")
            await until(
                lambda: bool(law.seen) and ("ghost", 5, "active") in law.seen[-1],
                "the dead worker's agent",
            )
            await until(lambda: law.seen[-1] == (("a1", 110, "active"),), "its entry to expire")
            members = await client.smembers(batch_key(batch_id, "acct"))
            assert b"dead" not in members
    finally:
        await client.aclose()


async def test_fitlaw_sizes_a_shared_window_from_every_workers_agents(
    redis_url: str, batch_id: str
) -> None:
    # Two workers with two agents each, 3,000-token contexts, on a 10,000-token cache (0.9 of
    # it: 9,000 tokens): alone, each worker's two agents fit; together three of the four do.
    # No agent is in a call (tool-bound), so FitLaw keeps the window open and says why, with
    # the batch's count.
    leader = ConcurSession(options(redis_url, batch_id, None))
    other = ConcurSession(options(redis_url, batch_id, None))
    async with leader, other:
        for session, name in ((leader, "a"), (other, "b")):
            for i in range(2):
                await call(session, f"{name}{i}", 2_900, 100)
        controller = leader.controller
        assert controller is not None

        def explained() -> bool:
            decision = controller.statistics().last_decision
            return decision is not None and "FitLaw: 3 of 4 agents fit" in decision.reason

        await until(explained, "FitLaw to count the four agents of both workers")
        for session, name in ((leader, "a"), (other, "b")):
            for i in range(2):
                await session.gate.release(f"{name}{i}")


def test_the_merge_orders_holders_by_admission_then_parked_then_new() -> None:
    def account(agent: str, state: str, order: int) -> AgentAccount:
        return AgentAccount(
            agent_id=agent, state=state, context=order, generated=0, steps=1, first_context=1,
            in_call=False, order=order,
        )  # fmt: skip

    one = [account("a", "active", 1), account("c", "active", 5), account("p", "parked", 2)]
    two = [account("n", "waiting", 1), account("b", "active", 3), account("q", "parked", 1)]
    merged = merge_accounts([one, two])
    assert [a.agent_id for a in merged] == ["a", "b", "c", "q", "p", "n"]
    assert decode(encode(one)) == one
    assert decode("not json") == []

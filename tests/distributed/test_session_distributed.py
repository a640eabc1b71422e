"""``ConcurGate(graph, vllm_url=..., redis_url=..., batch_id=...)`` in several worker processes.

Every worker runs the one-line usage against one simulated vLLM (``concur sim serve``, real time,
``test-tiny``) and one Redis. Who polls ``/metrics`` is read from the simulator's access log:
each worker scrapes from its own loopback address (127.0.0.N), so the log names the poller.
Checked: exactly one worker polls at a time, the window moves, killing the leader hands the
controller over (continuing from the stored window) and the batch completes; a joining worker
does not reset the window; bad option combinations name the field.

Nothing sleeps a fixed time to wait for something: conditions are polled with deadlines, and the
workers' agents loop until the test creates a stop file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis_asyncio
from langgraph.graph import END, START, MessagesState, StateGraph
from redis_support import REPO, Worker, eventually

from concur_langgraph import (
    ConcurCallbackHandler,
    ConcurError,
    ConcurGate,
    ConcurLaw,
    ConcurSession,
    ConfigError,
    FixedLaw,
    MetricsError,
    SessionOptions,
)
from concur_langgraph.distributed.redis_window import RedisWindow, batch_key

SESSION_WORKER = Path(__file__).with_name("_session_worker.py")
INTERVAL_S = 0.2
INITIAL = 2
# Bounds on a hang, not measurements: Python + langchain imports on a loaded 2-core box.
STARTUP_S = 30.0
# Leadership's default lease is 5 s: a dead leader is replaced within ttl_s + renew_s (6.7 s).
TAKEOVER_S = 15.0

_ACCESS = re.compile(r'(\d+\.\d+\.\d+\.\d+):\d+ - "GET /metrics ')


class SimServer:
    """``concur sim serve`` with its access log collected: who polled ``/metrics``, in order."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.polls: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concur_langgraph.cli", "sim", "serve", "--preset",
             "test-tiny", "--host", "127.0.0.1", "--port", str(self.port), "--log-level",
             "info"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = _ACCESS.search(line)
            if match:
                with self._lock:
                    self.polls.append(match.group(1))

    def mark(self) -> int:
        with self._lock:
            return len(self.polls)

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.polls[mark:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"concur sim serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("concur sim serve did not answer /health")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = SimServer()
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture
async def rclient(redis_url: str) -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def runs(polls: list[str]) -> list[str]:
    """The pollers in order with repeats collapsed: [a, a, b, b] -> [a, b]."""
    out: list[str] = []
    for ip in polls:
        if not out or out[-1] != ip:
            out.append(ip)
    return out


async def until(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    """Poll an async condition (a Redis read) until it holds; fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def stored_limit(client: Any, batch_id: str) -> int:
    return int(await client.get(batch_key(batch_id, "limit")))


@contextlib.asynccontextmanager
async def demand(redis_url: str, batch_id: str, agents: int = 40) -> AsyncIterator[None]:
    """Agents queued on the shared window from another client.

    The controller grows the window only up to the agents that hold or wait for a slot, so a
    test that watches the window grow needs some; they take slots as it grows and send nothing
    (the cache stays empty, so the law keeps growing).
    """
    window = RedisWindow(redis_url, batch_id=batch_id)
    async with window:
        tasks = [asyncio.create_task(window.acquire(f"demand-{i}")) for i in range(agents)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if not isinstance(result, BaseException):
                    await window.release(result)


def session_options(sim_url: str, redis_url: str, batch_id: str, **extra: Any) -> SessionOptions:
    return SessionOptions(
        vllm_url=sim_url,
        redis_url=redis_url,
        batch_id=batch_id,
        interval_s=0.1,
        initial_window=INITIAL,
        # These tests watch the window grow on an idle server: the paper's law does (+2 per
        # tick below u_low); the default law starts open and has no reason to move.
        law=extra.pop("law", None) or ConcurLaw(),
        **extra,
    )


async def test_one_leader_polls_and_a_killed_leader_is_replaced(
    sim: SimServer, redis_url: str, batch_id: str, rclient: Any, tmp_path: Path
) -> None:
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    stop = tmp_path / "stop"
    start = sim.mark()
    workers: list[Worker] = []
    try:
        for i, ip in enumerate(ips):
            args = ["--url", redis_url, "--batch", batch_id, "--sim", sim.url, "--source-ip",
                    ip, "--stop-file", str(stop), "--agents", "4", "--interval",
                    str(INTERVAL_S), "--initial-window", str(INITIAL)]  # fmt: skip
            workers.append(await Worker(f"w{i}", args, script=SESSION_WORKER).start())
        await eventually(
            lambda: all(w.count("stats") for w in workers), timeout_s=STARTUP_S, what="workers up"
        )
        # Every worker is in: a few more ticks of whoever leads.
        up = sim.mark()
        await eventually(lambda: len(sim.since(up)) >= 3, timeout_s=10, what="ticks")
        pollers = set(sim.since(start))
        assert len(pollers) == 1, f"several workers polled /metrics: {pollers}"
        (leader_ip,) = pollers
        leader = workers[ips.index(leader_ip)]
        followers = [w for w in workers if w is not leader]
        # The workers agree, and Redis names the same owner.
        await eventually(
            lambda: all((w.last("stats") or {}).get("leader") is (w is leader) for w in workers),
            timeout_s=5,
            what="leader flags in the workers' statistics",
        )
        owner = (leader.last("stats") or {})["owner"]
        key = (await rclient.get(batch_key(batch_id, "leader"))).decode()
        assert key.startswith(f"{owner}|"), (key, owner)
        # The window moves, and followers see it.
        assert await stored_limit(rclient, batch_id) != INITIAL
        moved = await stored_limit(rclient, batch_id)
        await eventually(
            lambda: all((w.last("stats") or {}).get("limit", 0) >= moved for w in followers),
            timeout_s=5,
            what="followers see the window",
        )

        leader.signal(signal.SIGKILL)
        await leader.wait(timeout_s=10)
        killed = sim.mark()
        at_kill = await stored_limit(rclient, batch_id)
        await eventually(lambda: bool(sim.since(killed)), timeout_s=TAKEOVER_S, what="takeover")
        successor_ip = sim.since(killed)[0]
        assert successor_ip != leader_ip
        # The successor continues from the stored window (never back to initial_window) and
        # keeps moving it.
        await until(
            lambda: _changed(rclient, batch_id, at_kill),
            timeout_s=TAKEOVER_S,
            what="the successor to move the window",
        )
        assert await stored_limit(rclient, batch_id) > INITIAL
        successor = workers[ips.index(successor_ip)]
        await eventually(
            lambda: (successor.last("stats") or {}).get("leader") is True,
            timeout_s=5,
            what="the successor's statistics",
        )

        stopped = sim.mark()
        stop.touch()
        for w in followers:
            assert await w.wait(timeout_s=30) == 0, w.stderr.decode()[-3000:]
    finally:
        stop.touch()
        for w in workers:
            await w.kill()

    # Exactly one poller at a time: the dead leader's run, then the successor's, nobody else.
    assert runs(sim.since(start)[: stopped - start]) == [leader_ip, successor_ip]
    # As the survivors finish, the one that exits first hands over to the other: still one
    # poller at a time, each reign one contiguous run.
    reigns = runs(sim.since(start))
    assert len(reigns) == len(set(reigns)), reigns
    for w in followers:
        result = w.last("results")
        assert result is not None, w.stderr.decode()[-3000:]
        assert result["n"] == result["complete"] == 4


async def _changed(client: Any, batch_id: str, old: int) -> bool:
    return await stored_limit(client, batch_id) != old


async def test_a_joining_worker_keeps_the_window_and_takes_over_from_it(
    sim: SimServer, redis_url: str, batch_id: str, rclient: Any
) -> None:
    async with demand(redis_url, batch_id):
        first = ConcurSession(session_options(sim.url, redis_url, batch_id))
        second = ConcurSession(session_options(sim.url, redis_url, batch_id))
        await first.__aenter__()
        try:
            assert first.statistics().leader is True
            # No agents run, so the KV cache is empty and the law only grows the window.
            await until(
                lambda: _at_least(rclient, batch_id, INITIAL + 6),
                timeout_s=10,
                what="the window to grow",
            )
            async with second:
                joined = await stored_limit(rclient, batch_id)
                assert joined >= INITIAL + 6, "the joining worker reset the window"
                stats = second.statistics()
                assert stats.leader is False and stats.controller is None
                assert stats.gate.window.limit >= INITIAL + 6
                # The follower's statistics follow the leader's moves.
                await eventually(
                    lambda: second.statistics().gate.window.limit > joined,
                    timeout_s=5,
                    what="the follower to see a move",
                )
                await first.__aexit__(None, None, None)
                handed = await stored_limit(rclient, batch_id)
                # A clean exit resigns: the hand-over takes one campaign period, not a lease.
                await eventually(
                    lambda: second.statistics().leader is True, timeout_s=10, what="hand-over"
                )
                assert await stored_limit(rclient, batch_id) >= handed
                await until(
                    lambda: _at_least(rclient, batch_id, handed + 2),
                    timeout_s=5,
                    what="the new leader to move the window",
                )
            final = second.statistics()
            assert final.controller is not None and final.controller.ticks > 0
            assert first.statistics().controller is not None
        finally:
            if not first.closed:
                await first.__aexit__(None, None, None)
        assert await rclient.get(batch_key(batch_id, "leader")) is None


async def _at_least(client: Any, batch_id: str, value: int) -> bool:
    return await stored_limit(client, batch_id) >= value


async def test_fixed_law_workers_agree_on_k_without_a_leader(
    redis_url: str, batch_id: str, rclient: Any
) -> None:
    async with RedisWindow(redis_url, batch_id=batch_id, initial_limit=7) as existing:
        assert existing.limit == 7
        async with (
            ConcurSession(law=FixedLaw(3), redis_url=redis_url, batch_id=batch_id) as a,
            ConcurSession(law=FixedLaw(3), redis_url=redis_url, batch_id=batch_id) as b,
        ):
            assert await stored_limit(rclient, batch_id) == 3
            assert a.statistics().leader is None and b.statistics().leader is None
            assert a.statistics().gate.window.limit == b.statistics().gate.window.limit == 3
            await a.gate.before_llm_call("agent-a")
            await b.gate.before_llm_call("agent-b")
            await until(
                lambda: _holders(rclient, batch_id, 2), timeout_s=5, what="two shared holders"
            )
            await a.gate.release("agent-a")
            await b.gate.release("agent-b")
        assert await rclient.get(batch_key(batch_id, "leader")) is None
        # A window passed in belongs to its caller (who may drive it): the session joins it.
        async with ConcurSession(law=FixedLaw(5), window=existing) as joined:
            assert await stored_limit(rclient, batch_id) == 3
            assert joined.statistics().gate.window.limit == 3
        # Still open (a closed window raises): the session does not close a window it was given.
        assert (await existing.refresh()).limit == 3


async def _holders(client: Any, batch_id: str, count: int) -> bool:
    return int(await client.zcard(batch_key(batch_id, "holders"))) == count


async def test_the_handler_and_the_gate_take_the_options(
    redis_url: str, batch_id: str, rclient: Any
) -> None:
    handler = ConcurCallbackHandler(law=FixedLaw(2), redis_url=redis_url, batch_id=batch_id)
    with pytest.raises(ConcurError, match="entered"):
        handler.session.check_usable("ConcurCallbackHandler")
    async with handler:
        assert handler.statistics().gate.window.limit == 2
        assert await stored_limit(rclient, batch_id) == 2
    gate = ConcurGate(
        _graph(), law=FixedLaw(5), redis_url=redis_url, batch_id=batch_id, progress=False
    )
    assert gate.options.redis_url == redis_url and gate.options.batch_id == batch_id
    async with gate:
        assert gate.session is not None and gate.session.distributed
        assert await stored_limit(rclient, batch_id) == 5


def _graph() -> Any:
    """A one-node compiled graph: the gate's constructor wants a real one."""

    async def noop(state: MessagesState) -> dict[str, Any]:
        return {}

    builder = StateGraph(MessagesState)
    builder.add_node("noop", noop)
    builder.add_edge(START, "noop")
    builder.add_edge("noop", END)
    return builder.compile()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"redis_url": "redis://localhost:6379/0"}, "batch_id"),
        ({"batch_id": "b1"}, "batch_id"),
        ({"redis_url": "http://localhost:6379", "batch_id": "b1"}, "redis_url"),
        ({"redis_url": "redis://localhost:6379/0", "batch_id": ""}, "batch_id"),
        ({"redis_url": "redis://localhost:6379/0", "batch_id": "a{b}"}, "batch_id"),
        (
            {
                "redis_url": "redis://localhost:6379/0",
                "batch_id": "b1",
                "window": RedisWindow("redis://localhost:6379/0", batch_id="b1"),
            },
            "window",
        ),
    ],
)
def test_bad_option_combinations_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        SessionOptions(law=FixedLaw(2), **kwargs)
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        ConcurGate(_graph(), law=FixedLaw(2), **kwargs)


async def test_a_wrong_vllm_url_fails_the_first_leader_at_entry_and_resigns(
    redis_url: str, batch_id: str, rclient: Any
) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    session = ConcurSession(vllm_url=dead, redis_url=redis_url, batch_id=batch_id)
    with pytest.raises(MetricsError):
        await session.__aenter__()
    assert session.closed
    assert await rclient.get(batch_key(batch_id, "leader")) is None


async def test_a_successor_that_cannot_scrape_keeps_the_lease_and_holds_the_window(
    sim: SimServer,
    redis_url: str,
    batch_id: str,
    rclient: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with demand(redis_url, batch_id):
        dead = f"http://127.0.0.1:{_closed_port()}"
        first = ConcurSession(session_options(sim.url, redis_url, batch_id))
        blind = ConcurSession(session_options(dead, redis_url, batch_id))
        await first.__aenter__()
        try:
            await until(
                lambda: _at_least(rclient, batch_id, INITIAL + 2), timeout_s=10, what="growth"
            )
            async with blind:
                await first.__aexit__(None, None, None)
                held = await stored_limit(rclient, batch_id)
                lead = blind.leadership
                assert lead is not None
                await eventually(lambda: lead.is_leader, timeout_s=10, what="hand-over")
                await eventually(
                    lambda: "cannot start its controller" in caplog.text,
                    timeout_s=5,
                    what="the warning",
                )
                # It keeps the lease (no second controller can start elsewhere) and holds.
                key = (await rclient.get(batch_key(batch_id, "leader"))).decode()
                assert key.startswith(f"{lead.owner}|")
                assert blind.statistics().leader is False
                assert await stored_limit(rclient, batch_id) == held
        finally:
            if not first.closed:
                await first.__aexit__(None, None, None)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port

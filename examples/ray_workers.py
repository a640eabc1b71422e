"""One LangGraph batch split over several Ray actors that share one admission window.

Usage::

    pip install 'concur-langgraph[sim,redis,ray]'
    .venv/bin/python examples/ray_workers.py [--actors 4] [--agents 8] [--window 6] [--dynamic]
        [--redis-url redis://...] [--vllm-url http://...] [--measure 300]

Without URLs it starts a throwaway ``redis-server`` (``apt-get install redis-server``) and a
simulated server (``concur sim serve --preset test-tiny``) on loopback, and a local Ray
cluster (``ray.init``). Each actor is an async actor that runs its share of the agents through
``ConcurGate(graph, vllm_url=..., redis_url=..., batch_id=...)``: the same line in every
actor, so they all join one window stored in Redis, and the server sees at most ``--window``
agents in total (per-actor semaphores would give it ``--window`` per actor). With
``--dynamic`` the window follows the server's KV-cache signals (the CONCUR law): the actors
elect one leader, which alone scrapes ``/metrics`` and resizes the shared window.

The rules for Ray: build the gate (and so its ``RedisWindow``) inside the actor, on the
actor's event loop, which is why the actor is async; give every actor the same ``redis_url``
and ``batch_id``; never pass a window or a permit between actors (a permit's lease is renewed
by the process that acquired it).

``--measure N`` also times N acquire + release pairs on the shared window from inside an actor
and from the driver, and N calls of an empty async actor method (what a window kept in a Ray
actor would cost per operation), and prints the percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import threading
import time
from typing import Any

import httpx
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from concur_langgraph import ConcurGate, ConcurLaw, FixedLaw, RedisWindow
from concur_langgraph.extras import require
from concur_langgraph.testing.agent_loop import observation_loop

ray = require("ray", what="examples/ray_workers.py")

STEPS = 2


def build_graph(vllm_url: str, model_name: str) -> Any:
    """A tiny agent: LLM call, timed "tool", LLM call, ... STEPS tools, then END."""
    model = ChatOpenAI(
        model=model_name,
        base_url=f"{vllm_url}/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=8,  # type: ignore[call-arg]
        max_retries=0,
        extra_body={"ignore_eos": True},
    )
    return observation_loop(model, steps=STEPS, tool_s=0.2)


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.3f} ms, p99 {p99:.3f} ms, max {ms[-1]:.3f} ms"


async def time_window(redis_url: str, batch_id: str, n: int) -> list[float]:
    """N uncontended acquire + release pairs on a window of the same Redis (its own batch)."""
    async with RedisWindow(redis_url, batch_id=batch_id, initial_limit=1) as window:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            permit = await window.acquire(f"probe-{i}")
            await window.release(permit)
            out.append(time.perf_counter() - t0)
        return out


# num_cpus=0: the actors wait on the network, not the CPU; a 2-core machine runs four of them.
@ray.remote(num_cpus=0)
class Worker:
    """An async actor: its methods run on one event loop in the actor's process."""

    def __init__(self, name: str, args: dict[str, Any]) -> None:
        self.name = name
        self.args = args

    async def run(self, first: int, count: int) -> dict[str, Any]:
        a = self.args
        # Built here, inside the actor, on its loop: the gate's session makes the RedisWindow
        # and (with signals) campaigns for leadership of the batch.
        law = ConcurLaw() if a["dynamic"] else FixedLaw(a["window"])
        gate = ConcurGate(
            build_graph(a["vllm_url"], a["model"]),
            vllm_url=a["vllm_url"] if a["dynamic"] else None,
            law=law,
            initial_window=a["window"],
            interval_s=0.5,
            redis_url=a["redis_url"],
            batch_id=a["batch_id"],
            progress=False,
        )
        tasks = [
            {"messages": [HumanMessage(f"agent {i}: " + "context " * 20)]}
            for i in range(first, first + count)
        ]
        t0 = time.monotonic()
        results = await gate.abatch(tasks, return_exceptions=True)
        stats = gate.statistics()
        assert stats is not None
        return {
            "name": self.name,
            "done": sum(not isinstance(r, BaseException) for r in results),
            "failed": [repr(r) for r in results if isinstance(r, BaseException)],
            "seconds": time.monotonic() - t0,
            "parks": stats.gate.parks_total,
            "led": stats.controller is not None,
        }

    async def time_window(self, n: int) -> list[float]:
        return await time_window(self.args["redis_url"], f"{self.args['batch_id']}-probe", n)

    async def ping(self) -> None:
        return None


class InFlightMonitor:
    """Polls the server's /metrics from a thread: the most requests it ever held at once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    held = 0.0
                    for line in client.get(f"{self.url}/metrics").text.splitlines():
                        if line.startswith(
                            ("vllm:num_requests_running{", "vllm:num_requests_waiting{")
                        ):
                            held += float(line.rsplit(" ", 1)[1])
                    self.peak = max(self.peak, int(held))
                self._stop.wait(0.01)

    def __enter__(self) -> InFlightMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> int:
    settings = {
        "vllm_url": args.vllm_url,
        "redis_url": args.redis_url,
        "batch_id": args.batch_id,
        "model": args.model,
        "window": args.window,
        "dynamic": args.dynamic,
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, logging_level="warning")
    try:
        workers = [Worker.remote(f"actor-{i}", settings) for i in range(args.actors)]  # type: ignore[attr-defined]
        with InFlightMonitor(args.vllm_url) as monitor:
            reports = ray.get(
                [w.run.remote(i * args.agents, args.agents) for i, w in enumerate(workers)]
            )
        for report in reports:
            print(
                f"[{report['name']}] {report['done']} agents done in {report['seconds']:.1f} s "
                f"({report['parks']} parks{', led the window' if report['led'] else ''})"
            )
            for failure in report["failed"][:3]:
                print(f"[{report['name']}] failed: {failure}")
        done = sum(r["done"] for r in reports)
        total = args.actors * args.agents
        print(f"{done} of {total} agents finished, {total - done} failed")
        print(f"most requests the server held at once: {monitor.peak} (window {args.window})")
        if args.measure:
            inside = ray.get(workers[0].time_window.remote(args.measure))
            outside = asyncio.run(
                time_window(args.redis_url, f"{args.batch_id}-driver", args.measure)
            )
            print(f"acquire+release on RedisWindow, inside a Ray actor: {percentiles(inside)}")
            print(f"acquire+release on RedisWindow, in the driver:      {percentiles(outside)}")
            ray.get(workers[1 % len(workers)].ping.remote())  # warm
            calls = []
            for _ in range(args.measure):
                t0 = time.perf_counter()
                ray.get(workers[1 % len(workers)].ping.remote())
                calls.append(time.perf_counter() - t0)
            print(f"one empty async actor call (driver -> actor):   {percentiles(calls)}")
        return 0 if done == total else 1
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--agents", type=int, default=8, help="agents per actor")
    parser.add_argument("--window", type=int, default=6, help="fixed (or initial) window")
    parser.add_argument("--dynamic", action="store_true", help="CONCUR law, leader-driven")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--vllm-url", default=None)
    parser.add_argument("--model", default="test-tiny")
    parser.add_argument("--batch-id", default=f"ray-example-{int(time.time())}")
    parser.add_argument("--measure", type=int, default=0, help="time N window round trips")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.redis_url is None:
            from concur_langgraph.testing.redis_server import RedisServer

            args.redis_url = stack.enter_context(RedisServer()).url
        if args.vllm_url is None:
            from concur_langgraph.testing.sim_process import served_simulator

            args.vllm_url = stack.enter_context(served_simulator("--preset", "test-tiny")).url
        raise SystemExit(run(args))


if __name__ == "__main__":
    main()

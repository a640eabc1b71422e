"""N worker processes, one admission window: a LangGraph batch split across processes.

Usage::

    .venv/bin/python examples/distributed_workers.py [--workers 4] [--agents 16] [--window 6]
        [--dynamic] [--redis-url redis://...] [--vllm-url http://...]

Without URLs it starts a throwaway ``redis-server`` (``apt-get install redis-server``) and a
simulated vLLM (``concur sim serve --preset test-tiny``) on loopback. Each worker process runs
its share of the agents through ``ConcurGate(graph, window=RedisWindow(...))``: the window is
shared, so the server sees at most ``--window`` agents in total, not ``--window`` per process
(which is what per-process semaphores give you).

With ``--dynamic`` the window follows the server's KV-cache signals (the CONCUR law): every
worker campaigns for leadership, and only the leader runs the controller, through the fenced
window ``lead.fence(window)``; if the leader dies, another worker takes over within the lease
and continues from the window stored in Redis.

Ray: a Ray actor is a process like any other here: build the ``RedisWindow`` (and, for
``--dynamic``, the ``Leadership``) inside the actor, on its event loop, with the same
``batch_id`` in every actor; never pass a window object between actors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import socket
import subprocess
import sys
import time
from typing import Any

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph

from concur_langgraph import (
    ConcurGate,
    ConcurLaw,
    Controller,
    FixedLaw,
    RedisWindow,
    VLLMMetricsSource,
)
from concur_langgraph.distributed.leader import Leadership

STEPS = 2


class LoopState(MessagesState):
    steps: int


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

    async def agent(state: LoopState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    async def tool(state: LoopState) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        step = state.get("steps", 0) + 1
        return {"messages": [HumanMessage(f"observation {step}")], "steps": step}

    def route(state: LoopState) -> str:
        return "tool" if state.get("steps", 0) < STEPS else END

    builder = StateGraph(LoopState)
    builder.add_node("agent", agent)
    builder.add_node("tool", tool)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, {"tool": "tool", END: END})
    builder.add_edge("tool", "agent")
    return builder.compile()


async def drive_window(args: argparse.Namespace, window: RedisWindow) -> None:
    """Campaign; while leader, run the CONCUR controller on the fenced window."""
    async with Leadership(args.redis_url, batch_id=args.batch_id) as lead:
        while True:
            await lead.wait_leader()
            stored = (await window.refresh()).limit  # continue from the shared window
            print(f"[{args.name}] leads (epoch {lead.epoch}), window {stored}", flush=True)
            controller = Controller(
                source=VLLMMetricsSource(args.vllm_url),
                law=ConcurLaw(),
                window=lead.fence(window),
                interval_s=0.5,
                initial_window=stored,
            )
            async with controller:
                await lead.wait_lost()


async def worker(args: argparse.Namespace, first: int) -> None:
    graph = build_graph(args.vllm_url, args.model)
    async with RedisWindow(
        args.redis_url, batch_id=args.batch_id, initial_limit=args.window
    ) as window:
        driver = asyncio.create_task(drive_window(args, window)) if args.dynamic else None
        # FixedLaw(k) with the window given: the gate uses the shared window as it is; it only
        # sets it (to k) if it differs, so every worker passes the same k.
        gate = ConcurGate(graph, law=FixedLaw(window.limit), window=window)
        tasks = [
            {"messages": [HumanMessage(f"agent {i}: " + "context " * 20)]}
            for i in range(first, first + args.agents)
        ]
        t0 = time.monotonic()
        results = await gate.abatch(tasks)
        stats = gate.statistics()
        if driver is not None:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver
    parks = stats.gate.parks_total if stats is not None else 0
    print(
        f"[{args.name}] {len(results)} agents done in {time.monotonic() - t0:.1f} s "
        f"({parks} parks)",
        flush=True,
    )


def run_worker(args: argparse.Namespace, index: int) -> None:
    args.name = f"worker-{index}"
    asyncio.run(worker(args, index * args.agents))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def simulator() -> Any:
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "concur_langgraph.cli", "sim", "serve", "--preset", "test-tiny",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("the simulator did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--agents", type=int, default=16, help="agents per worker")
    parser.add_argument("--window", type=int, default=6, help="initial (or fixed) window")
    parser.add_argument("--dynamic", action="store_true", help="CONCUR law, leader-driven")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--vllm-url", default=None)
    parser.add_argument("--model", default="test-tiny")
    parser.add_argument("--batch-id", default=f"example-{int(time.time())}")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.redis_url is None:
            from concur_langgraph.testing.redis_server import RedisServer

            args.redis_url = stack.enter_context(RedisServer()).url
        if args.vllm_url is None:
            args.vllm_url = stack.enter_context(simulator())
        # "spawn": each worker is a fresh interpreter, as on separate hosts.
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=run_worker, args=(args, i)) for i in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise SystemExit(f"{len(failed)} worker(s) failed: exit codes {failed}")


if __name__ == "__main__":
    main()

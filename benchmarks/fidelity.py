"""Simulator fidelity: the same agent batch on a real vLLM (real time) and on the calibrated
simulator (virtual time), side by side (docs/simulator.md, "Fidelity against a real vLLM").

Stages (``--stages``, default all of them, in this order):

* ``calibrate``: ``--calibration-repeats`` rounds of the calibration measurements of
  ``concur sim calibrate`` (``concur_langgraph.sim._calibrate.measure``: single prefills of
  64-1024 tokens, decode runs of 1/4/8 requests), appended to ``--samples`` (JSON lines).
* ``steps``: ``--steps-rounds`` rounds of decode-step timings at batch sizes 1-32 (two decode
  runs per batch size, 16 and 256 output tokens; the difference is one step), written to
  ``--steps-out`` with the load average and added to ``--samples`` (tag ``batch-sweep``). Needs
  a server whose KV cache holds 32 x 320 tokens: ``--serve`` starts one with 64 MiB for it.
* ``real``: the ``real-24`` workload (ReAct agents x 6 steps, 96 output tokens per step,
  tools 0.2-2 s) with each of ``--agents`` agents under each ``--policy``, ``--repeats``
  times, on the real server in real time; records appended to ``--runs`` (JSON lines; cells
  already there are skipped, so an interrupted run continues). Unless ``--no-interleave``,
  one calibration round runs right before each real run: the fit then sees the server under
  the load the runs saw (on this shared 2-core machine, three single rounds taken one after
  the other gave constants 2-3x apart).
* ``fit``: one :class:`CostModel` fitted on every pooled measurement of ``--samples``, on the
  ``cpu-tiny`` preset (KV geometry, ``reuse_generated_blocks=False``), the decode knee chosen
  among ``DECODE_KNEES``, written to ``--config``.
* ``sim``: the same cells on the simulator configured by ``--config`` (virtual time: once,
  exact and repeatable).
* ``report``: real medians (with min-max) against the simulator, the ratio sim/real per
  metric, the ranking of policies per agent count; printed as markdown and written to
  ``--out`` (JSON).

    python benchmarks/fidelity.py --serve                   # starts the CPU vLLM itself
    python benchmarks/fidelity.py --url http://127.0.0.1:PORT
    python benchmarks/fidelity.py --stages sim,report       # re-run the model only (minutes)
    python benchmarks/fidelity.py --url URL64 --stages steps,fit,sim,report   # step times
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

import httpx
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph.bench._runner import SimBackend, UrlBackend, run_one
from concur_langgraph.bench._workload import Workload, load_workload
from concur_langgraph.sim._calibrate import (
    CalibrationSample,
    calibrated_config,
    fit_cost_model,
    measure,
    measure_decode_steps,
)
from concur_langgraph.sim._cli import config_to_json, load_config
from concur_langgraph.sim._presets import get_preset

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METRICS = ("makespan_s", "preemptions", "prefix_hit_rate", "generated_tokens")
TARGET = (0.75, 1.33)
STAGES = ("calibrate", "steps", "real", "fit", "sim", "report")
STEP_BATCHES = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
STEPS_KV_BYTES = 64 * 1024 * 1024
DECODE_KNEES = (0, 4, 8, 12, 16, 24)
"""Candidate knees of the decode term; the fit keeps the one with the smallest residual."""


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


def steps_stage(url: str, rounds: int, steps_path: Path, samples_path: Path) -> None:
    """Rounds of decode-step timings at batch sizes 1-32 (``measure_decode_steps``).

    Each batch size is two decode runs (16 and 256 output tokens); their difference is one
    decode step, model-free, written to ``steps_path`` with the load average around it. Both
    runs also join the pooled calibration measurements (tag ``batch-sweep``), so the fit sees
    batches beyond the 8 of ``concur sim calibrate``. The server's KV cache must hold 32
    sequences of ~320 tokens (``--kv-cache-memory-bytes 67108864``; the fidelity server's 16 MiB
    holds 31 blocks of 128 and would preempt).
    """
    for i in range(rounds):
        load0 = _load()
        got = asyncio.run(measure_decode_steps(url, model="tiny", batch_sizes=STEP_BATCHES))
        load1 = _load()
        with (
            steps_path.open("a", encoding="utf-8") as out,
            samples_path.open("a", encoding="utf-8") as pooled,
        ):
            for sample in got:
                row = {
                    "batch": sample.batch,
                    "step_s": sample.step_s,
                    "short": dataclasses.asdict(sample.short),
                    "long": dataclasses.asdict(sample.long),
                    "load_avg_1m": [load0, load1],
                    "round": i,
                }
                out.write(json.dumps(row, sort_keys=True) + "\n")
                for run in (sample.short, sample.long):
                    pooled_row = dataclasses.asdict(run)
                    pooled_row.update(tag="batch-sweep", load_avg_1m=load0)
                    pooled.write(json.dumps(pooled_row, sort_keys=True) + "\n")
        steps = ", ".join(f"{s.batch}: {s.step_s * 1e3:.1f}" for s in got)
        print(
            f"  step-time round {i + 1}/{rounds} (load {load0:.1f}-{load1:.1f}), ms: {steps}",
            file=sys.stderr,
            flush=True,
        )


def step_summary(steps_path: Path) -> dict[str, Any]:
    """Per batch size: the decode-step times measured (ms), their quartiles and the loads."""
    rows = _read(steps_path)
    out: dict[str, Any] = {}
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        ms = sorted(r["step_s"] * 1e3 for r in mine)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        out[str(batch)] = {
            "n": len(ms),
            "min_ms": ms[0],
            "q1_ms": q[0],
            "median_ms": q[1],
            "q3_ms": q[2],
            "max_ms": ms[-1],
            "load_avg_1m_range": [
                min(r["load_avg_1m"][0] for r in mine),
                max(r["load_avg_1m"][1] for r in mine),
            ],
        }
    return out


def fit_stage(samples_path: Path, out: Path) -> dict[str, Any]:
    """Fit one cost model on every pooled measurement; write the calibrated cpu-tiny config."""
    names = {f.name for f in dataclasses.fields(CalibrationSample)}
    rows = _read(samples_path)
    samples = [CalibrationSample(**{k: v for k, v in r.items() if k in names}) for r in rows]
    base = get_preset("cpu-tiny")
    cost = fit_cost_model(
        samples, kv_bytes_per_token=base.cost.kv_bytes_per_token, decode_knees=DECODE_KNEES
    )
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


_ENGINE_SERIES = (
    "vllm:iteration_tokens_total_count",
    "vllm:iteration_tokens_total_sum",
    "vllm:inter_token_latency_seconds_count",
    "vllm:inter_token_latency_seconds_sum",
)


def _engine_counters(url: str) -> dict[str, float]:
    """The real server's step and inter-token-latency histograms (summed over engines)."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=30.0).text
    out = dict.fromkeys(_ENGINE_SERIES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def _engine_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Engine steps of one run, tokens per step and the mean inter-token latency: how long a
    step took while agents ran (the simulator's own steps are comparable to the first two)."""
    d = {k: after[k] - before[k] for k in _ENGINE_SERIES}
    steps = d["vllm:iteration_tokens_total_count"]
    itl_n = d["vllm:inter_token_latency_seconds_count"]
    return {
        "engine_steps": steps,
        "tokens_per_step": d["vllm:iteration_tokens_total_sum"] / steps if steps else None,
        "mean_itl_ms": 1e3 * d["vllm:inter_token_latency_seconds_sum"] / itl_n if itl_n else None,
    }


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
                before = _engine_counters(url)
                record = run_one(_workload(n), policy, backend, interval_s=1.0)
                row = _row(record, agents=n, repeat=repeat, load0=load0)
                row.update(_engine_stats(before, _engine_counters(url)))
                _append(runs, row)
                print(
                    f"  real {n:>3} agents {policy:<10} #{repeat}: {row['makespan_s']:6.1f} s, "
                    f"{row['preemptions']} preemptions, hit {row['prefix_hit_rate']:.3f}, "
                    f"load {load0:.1f}",
                    file=sys.stderr,
                    flush=True,
                )


def sim_stage(
    config_path: Path, agents: Sequence[int], policies: Sequence[str], runs: Path
) -> None:
    config = load_config(None, str(config_path))
    # Older records of the simulator side are replaced; the real ones are kept.
    kept = [r for r in _read(runs) if not r["backend"].startswith("sim")]
    runs.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    backend = SimBackend(config=config, name=config_path.name)
    for n in agents:
        for policy in policies:
            t0 = time.perf_counter()
            record = run_one(_workload(n), policy, backend, interval_s=1.0)
            row = _row(record, agents=n, repeat=0, load0=_load())
            row["backend"] = "sim"
            _append(runs, row)
            print(
                f"  sim {n:>3} agents {policy:<10}: "
                f"{row['makespan_s']:6.1f} s, {row['preemptions']} preemptions, "
                f"hit {row['prefix_hit_rate']:.3f} (wall {time.perf_counter() - t0:.1f} s)",
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
    rows: list[dict[str, Any]], agents: Sequence[int], policies: Sequence[str]
) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    for n in agents:
        for policy in policies:
            mine = [r for r in rows if (r["agents"], r["policy"]) == (n, policy)]
            real = [r for r in mine if r["backend"].startswith("vllm:")]
            sim = [r for r in mine if r["backend"] == "sim"]
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
    comparison = _compare(rows, agents, policies)
    result: dict[str, Any] = {"target": list(TARGET), **comparison, **extra}
    out.write_text(json.dumps(_strict(result), indent=2, sort_keys=True) + "\n")
    inside, total = comparison["ratios_in_target"]
    print(f"\n### {inside}/{total} ratios within {TARGET}\n")
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
    for n, order in sorted(result["ranking"].items(), key=lambda item: int(item[0])):
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
    parser.add_argument("--steps-rounds", type=int, default=4)
    parser.add_argument("--steps-out", type=Path, default=RESULTS / "fidelity-step-times.jsonl")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    agents = [int(a) for a in args.agents.split(",")]
    policies = args.policy or ["none", "static:12", "static:4"]
    RESULTS.mkdir(exist_ok=True)
    needs_server = {"calibrate", "steps", "real"} & set(stages)
    server = None
    url = args.url
    if needs_server and url is None and not args.serve:
        parser.error("calibrate, steps and real need --url URL or --serve")
    if args.serve and "steps" in stages:
        from concur_langgraph.testing.vllm_cpu import VLLMServerConfig, start_server

        big = start_server(VLLMServerConfig(kv_cache_memory_bytes=STEPS_KV_BYTES))
        try:
            steps_stage(big.base_url, args.steps_rounds, args.steps_out, args.samples)
        finally:
            big.stop()
        stages.remove("steps")
    if args.serve and {"calibrate", "real"} & set(stages):
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
        if "steps" in stages:
            assert url is not None
            steps_stage(url, args.steps_rounds, args.steps_out, args.samples)
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
        sim_stage(args.config, agents, policies, args.runs)
    if "report" in stages:
        extra["config"] = json.loads(args.config.read_text())
        if args.steps_out.exists():
            extra["step_times"] = step_summary(args.steps_out)
        report_stage(args.runs, args.out, agents, policies, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

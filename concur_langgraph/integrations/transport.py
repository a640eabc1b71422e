"""Send each agent's calls to its replica: an httpx transport that routes by the calling agent.

With several replicas (``vllm_url=[...]``), the gate places every agent on one replica and keeps
it there (``core/replicas.py``); the calls themselves go out through the model's HTTP client,
which the gate does not own. :func:`routed_http_client` is that client: give it to the model
(``ChatOpenAI(base_url=<any replica>/v1, http_async_client=routed_http_client())``), and each
request of an agent is re-addressed to its replica before it is sent. It works the same for all
four ways in, because it finds the calling agent from LangGraph's own run context (the thread
id, set for every node of a run and visible inside the model's HTTP call) and the gate from the
agent (the live gate that placed it), so it can be built before the gate, as a model is.

A request that is not an agent's (no thread id), or of an agent no gate placed (a call outside a
gated run, or a single-server batch), is sent where it was addressed. A replica that refuses the
connection (``httpx.ConnectError``: the request never reached it) is marked dead; the agent is
moved to a live replica and the request sent there at once. Errors after the request was sent
are the client's to retry (the OpenAI SDK retries connection errors), and the retry is routed
again: to the new replica if the old one was marked dead meanwhile.

With ``priority_hint=True`` (a session option), each agent's completion requests also carry
``"priority"``: its admission rank (``Gate.priority_of``), for a vLLM started with
``--scheduling-policy priority``; on one server too, where nothing is routed.

A client with an HTTP stack of its own can route the same way: ``replica_url(thread_id)`` says
where an agent's next call must go.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from langchain_core.runnables.config import var_child_runnable_config

from concur_langgraph.core.gate import find_gate
from concur_langgraph.core.replicas import CALLING_AGENT, ReplicaGate, find_replica_gate

__all__ = ["RoutingTransport", "current_agent_id", "replica_url", "routed_http_client"]


def current_agent_id() -> str | None:
    """The gate's id of the agent this code runs for: the one the middleware set around its
    model call, else the thread id of the LangGraph run this code runs in; ``None`` outside a
    run or in a run without either."""
    calling = CALLING_AGENT.get()
    if calling is not None:
        return calling
    config = var_child_runnable_config.get()
    if not config:
        return None
    thread_id = (config.get("configurable") or {}).get("thread_id")
    return None if thread_id is None else str(thread_id)


async def replica_url(agent_id: str | None = None) -> str | None:
    """The base URL of the replica the agent's next call must go to (default: the calling
    agent), or ``None`` when no live gate placed it (send the call anywhere)."""
    agent_id = agent_id if agent_id is not None else current_agent_id()
    if agent_id is None:
        return None
    gate = find_replica_gate(agent_id)
    return None if gate is None else await gate.route(agent_id)


def _readdress(request: httpx.Request, target: str, known: tuple[str, ...]) -> httpx.Request:
    url = str(request.url)
    rest = None
    for base in known:
        if url.startswith(base + "/") or url == base:
            rest = url[len(base) :]
            break
    if rest is None:
        # Addressed to a server we do not know (a placeholder base URL): keep the path.
        rest = request.url.raw_path.decode("ascii")
    new_url = httpx.URL(target + rest)
    headers = request.headers.copy()
    headers["host"] = new_url.netloc.decode("ascii")
    return httpx.Request(
        request.method,
        new_url,
        headers=headers,
        stream=request.stream,
        extensions=request.extensions,
    )


def _with_priority(request: httpx.Request, priority: int | None) -> httpx.Request:
    """``request`` with ``"priority": priority`` in its JSON body (a completion request whose
    body has no priority of its own); unchanged otherwise."""
    if priority is None or request.method != "POST":
        return request
    if not request.url.path.endswith(("/chat/completions", "/completions")):
        return request
    try:
        body = json.loads(request.read())
    except ValueError:
        return request
    if not isinstance(body, dict) or "priority" in body:
        return request
    body["priority"] = priority
    headers = request.headers.copy()
    del headers["content-length"]
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        content=json.dumps(body).encode(),
        extensions=request.extensions,
    )


class RoutingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that re-addresses each agent's request to its replica, then sends it
    through ``transport`` (default: a new ``httpx.AsyncHTTPTransport()``; the simulator's
    ``SimCluster.transport()`` in tests)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        agent_id = current_agent_id()
        if agent_id is None:
            return await self._inner.handle_async_request(request)
        replicas = find_replica_gate(agent_id)
        if replicas is None:
            gate = find_gate(agent_id)
            priority = gate.priority_of(agent_id) if gate is not None else None
            return await self._inner.handle_async_request(_with_priority(request, priority))
        while True:
            target = await replicas.route(agent_id)
            if target is None:  # released meanwhile
                return await self._inner.handle_async_request(request)
            routed = _readdress(request, target, replicas.urls)
            routed = _with_priority(routed, replicas.priority_of(agent_id))
            try:
                return await self._inner.handle_async_request(routed)
            except httpx.ConnectError as exc:
                # Refused: the request never reached the replica. Take it out of the batch and
                # send the request to the agent's new replica (ReplicaError when none is left).
                await _mark_dead(replicas, target, exc)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _mark_dead(gate: ReplicaGate, target: str, exc: BaseException) -> None:
    await gate.mark_dead(gate.urls.index(target), reason=f"{type(exc).__name__}: {exc}")


def routed_http_client(
    *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose requests go to the calling agent's replica
    (:class:`RoutingTransport` over ``transport``); other keywords go to the client (timeouts,
    limits: size the pool for every agent, ``httpx.Limits(max_connections=agents + 16)``).

    Without ``transport``, ``limits``, ``verify`` and ``http2`` configure the HTTP transport it
    makes (an httpx client ignores them when it is given a transport)."""
    if transport is None:
        transport_options = {
            key: kwargs.pop(key) for key in ("limits", "verify", "http2") if key in kwargs
        }
        transport = httpx.AsyncHTTPTransport(**transport_options)
    return httpx.AsyncClient(transport=RoutingTransport(transport), **kwargs)

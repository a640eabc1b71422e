"""Several simulated vLLM replicas in one process: a data-parallel deployment in virtual time.

``SimCluster("h100-qwen3-32b-tp2", replicas=4)`` builds four independent :class:`SimServer`\\ s,
replica ``i`` rooted at ``http://replica-{i}.concur-sim``. Each has its own engine (its own KV
cache, counters and step loop; all step on the one event loop's clock, so they also run under
:mod:`concur_langgraph.vtime`) and its own ``/metrics``. Nothing is shared between replicas: a
prefix cached on one is a miss on every other, as with real data-parallel engines.

:meth:`SimCluster.transport` is one ``httpx`` transport for all of them: it sends each request to
the replica whose host the URL names, in process (``httpx.ASGITransport``, no sockets). A client
that picks the replica (a placement policy, the gate) rewrites the URL's host and sends through
it. An unknown host fails as DNS would, with ``httpx.ConnectError`` naming the host.

Replica death. :meth:`SimCluster.kill` makes replica ``i`` behave like a crashed server process:

* every later request to it fails with ``httpx.ConnectError`` (a refused connection), its
  ``/metrics`` included;
* every request in flight on it fails in its client with ``httpx.RemoteProtocolError`` (the
  connection dropped before a complete response), not with a normal answer; the handler is
  cancelled, so its engine request is aborted;
* its engine stops (its step loop is cancelled; the cluster awaits it in :meth:`aclose`).

:meth:`SimCluster.revive` brings a killed replica back as a restarted server would come: a
fresh engine (empty cache, counters from 0) on the same host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import httpx

from concur_langgraph.errors import ConfigError
from concur_langgraph.sim._config import SimConfig
from concur_langgraph.sim._faults import Faults
from concur_langgraph.sim._presets import get_preset
from concur_langgraph.sim._server import DEFAULT_HOST, SimServer, check_exposition

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

__all__ = ["SimCluster", "replica_host"]

_DROPPED: Final = "Server disconnected without sending a response."
"""httpx's words (from h11) when a server closes a connection mid-request."""


def replica_host(index: int) -> str:
    """Host name of replica ``index`` (``replica-0.concur-sim``, ...)."""
    return f"replica-{index}.{DEFAULT_HOST}"


class _Replica:
    """One replica's server and the client requests now in flight on it."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.transport = httpx.ASGITransport(app=server.app)
        self.dead = False
        self.in_flight: set[asyncio.Task[httpx.Response]] = set()
        self.killed: set[asyncio.Task[httpx.Response]] = set()
        """Handler tasks cancelled by :meth:`SimCluster.kill` (their clients get a dropped
        connection, not a cancellation)."""


class _DispatchTransport(httpx.AsyncBaseTransport):
    """Sends each request to the replica its URL's host names."""

    def __init__(self, cluster: SimCluster) -> None:
        self._cluster = cluster

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        cluster = self._cluster
        host = request.url.host
        index = cluster.replica_index(host)
        if index is None:
            raise httpx.ConnectError(
                f"unknown host {host!r}: no replica of this cluster is called so "
                f"(replicas: {', '.join(cluster.hosts)})",
                request=request,
            )
        replica = cluster._replicas[index]
        if replica.dead:
            raise httpx.ConnectError(
                f"connection refused: replica {index} ({host}) is down", request=request
            )
        task = asyncio.ensure_future(replica.transport.handle_async_request(request))
        replica.in_flight.add(task)
        try:
            # Cancelling this coroutine cancels the handler too (a client that goes away):
            # the server then aborts the engine request, as on a closed socket.
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task in replica.killed and not (current is not None and current.cancelling()):
                raise httpx.RemoteProtocolError(
                    f"{_DROPPED} (replica {index} at {host} died mid-request)", request=request
                ) from None
            raise
        finally:
            replica.in_flight.discard(task)
            replica.killed.discard(task)


class SimCluster:
    """``replicas`` independent simulated vLLM servers behind one dispatching transport.

    Args:
        config: a :class:`SimConfig` or a preset name; every replica gets the same one.
        replicas: how many (>= 1).
        engine: whose ``/metrics`` they speak, ``"vllm"`` or ``"sglang"`` (as
            :class:`SimServer`).
        faults: faults from the start: one :class:`Faults` for every replica (each gets its own
            injector), or a sequence with one entry (``Faults`` or ``None``) per replica.
    """

    def __init__(
        self,
        config: SimConfig | str,
        replicas: int,
        *,
        engine: str = "vllm",
        faults: Faults | Sequence[Faults | None] | None = None,
    ) -> None:
        if isinstance(config, str):
            config = get_preset(config)
        if not isinstance(config, SimConfig):
            raise ConfigError(
                "SimCluster config must be a SimConfig or a preset name, "
                f"got {type(config).__name__}"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ConfigError(f"replicas: must be an integer >= 1, got {replicas!r}")
        self.config = config
        self.exposition = check_exposition(engine, "engine")
        if faults is None or isinstance(faults, Faults):
            per_replica: list[Faults | None] = [faults] * replicas
        elif isinstance(faults, Sequence) and not isinstance(faults, str):
            per_replica = list(faults)
            if len(per_replica) != replicas or not all(
                f is None or isinstance(f, Faults) for f in per_replica
            ):
                raise ConfigError(
                    f"faults: expected Faults, or a sequence of {replicas} Faults-or-None "
                    f"(one per replica), got {faults!r}"
                )
        else:
            raise ConfigError(
                f"faults: expected Faults or a sequence of them, got {type(faults).__name__}"
            )
        self._faults = per_replica
        self.hosts: tuple[str, ...] = tuple(replica_host(i) for i in range(replicas))
        """Host name of each replica, by index."""
        self._index = {host: i for i, host in enumerate(self.hosts)}
        self._replicas = [self._new_replica(i) for i in range(replicas)]
        self._closing: list[asyncio.Task[None]] = []

    def _new_replica(self, index: int) -> _Replica:
        server = SimServer(
            self.config,
            host=self.hosts[index],
            faults=self._faults[index],
            engine=self.exposition,
        )
        return _Replica(server)

    # -- what the replicas are ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def servers(self) -> list[SimServer]:
        """The replicas' servers, by index (a revived replica has a new one)."""
        return [r.server for r in self._replicas]

    @property
    def root_urls(self) -> list[str]:
        """Each replica's root URL (``http://replica-i.concur-sim``: ``/metrics`` is there)."""
        return [f"http://{host}" for host in self.hosts]

    @property
    def base_urls(self) -> list[str]:
        """Each replica's OpenAI base URL (``.../v1``)."""
        return [f"{root}/v1" for root in self.root_urls]

    @property
    def model_name(self) -> str:
        """The served model name clients must send."""
        return self.config.model_name

    def replica_index(self, host: str) -> int | None:
        """The index of the replica called ``host``; ``None`` if none is."""
        return self._index.get(host)

    def alive(self, index: int) -> bool:
        """Whether replica ``index`` serves (not killed, or revived since)."""
        return not self._replicas[self._check(index)].dead

    def in_flight(self, index: int) -> int:
        """Client requests now in flight on replica ``index`` (as its connections see them)."""
        return len(self._replicas[self._check(index)].in_flight)

    def _check(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ConfigError(f"replica: must be an integer index, got {index!r}")
        if not 0 <= index < len(self._replicas):
            raise ConfigError(f"replica: must be in [0, {len(self._replicas)}), got {index}")
        return index

    # -- clients ---------------------------------------------------------------------------
    def transport(self) -> httpx.AsyncBaseTransport:
        """A transport that sends each request to the replica its URL's host names."""
        return _DispatchTransport(self)

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on :meth:`transport` (``base_url``: replica 0's root unless
        given; absolute URLs reach any replica)."""
        kwargs.setdefault("base_url", self.root_urls[0])
        return httpx.AsyncClient(transport=self.transport(), **kwargs)

    def chat_model(self, **kwargs: Any) -> ChatOpenAI:
        """A ``ChatOpenAI`` as :meth:`SimServer.chat_model` makes one, on replica 0's base URL
        and an HTTP client on :meth:`transport` (so a transport of the caller's that rewrites
        the host can send its calls to any replica). Keyword arguments override."""
        kwargs.setdefault("base_url", self.base_urls[0])
        if "http_async_client" not in kwargs:
            kwargs["http_async_client"] = self.http_client()
        return self._replicas[0].server.chat_model(**kwargs)

    # -- replica death ---------------------------------------------------------------------
    def kill(self, index: int) -> None:
        """Replica ``index`` dies now (see the module docstring); idempotent.

        Must be called from the event loop the cluster runs on (its in-flight handlers are
        cancelled there; the engine's shutdown is awaited by :meth:`aclose`).
        """
        replica = self._replicas[self._check(index)]
        if replica.dead:
            return
        replica.dead = True
        for task in list(replica.in_flight):
            if not task.done():
                replica.killed.add(task)
                task.cancel()
        self._closing.append(asyncio.ensure_future(replica.server.aclose()))

    def revive(self, index: int) -> None:
        """Bring a killed replica back as a restarted server: a fresh engine (empty KV cache,
        counters from 0) and fault injector on the same host. A live replica is left as is."""
        if not self._replicas[self._check(index)].dead:
            return
        self._replicas[index] = self._new_replica(index)

    # -- lifetime ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop every replica's engine (requests still in one finish as ``"abort"``)."""
        for replica in self._replicas:
            replica.dead = True
            await replica.server.aclose()
        closing, self._closing = self._closing, []
        for task in closing:
            await task

    async def __aenter__(self) -> SimCluster:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

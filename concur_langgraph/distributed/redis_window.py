"""The distributed admission window: one window shared by many processes through Redis.

:class:`RedisWindow` follows :class:`~concur_langgraph.core.window.AdmissionWindow` and passes the
same conformance suite as :class:`~concur_langgraph.core.window.LocalWindow`: trio resize semantics,
FIFO with parked agents first, victims = most recently admitted, idempotent release,
cancellation-safe acquire. What changes is where the state lives.

State (all keys of one batch share the hash tag ``concur:{BATCH}:``, so a batch also fits one
Redis Cluster slot):

=============  ======  =================================================================
key            type    meaning
=============  ======  =================================================================
``limit``      string  the window
``holders``    zset    token -> admission seq (the order ``must_park`` ranks by)
``wait:p``     zset    parked waiters, token -> arrival seq (served first)
``wait:n``     zset    never-admitted waiters, token -> arrival seq
``lease``      zset    token -> lease expiry (Redis ``TIME``, ms), holders and waiters alike
``seq``        string  admission counter; ``qseq``: arrival counter
``meta``       hash    ``inc`` (incarnation id), ``ver`` (state version), totals
``events``     pubsub  one JSON snapshot per change (limit, holders, victims, grants)
=============  ======  =================================================================

Every mutation is one Lua script (acquire, release, resize, heartbeat, re-register): it first
reaps expired leases, then changes the state, then grants from ``limit - holders`` (parked queue
first), then publishes a snapshot. No client ever reads-then-writes, so there are no races.

Leases. Every token (one per acquisition) carries a lease of ``lease_ttl_s``. One heartbeat task
per process renews all of that process's tokens in one script every ``heartbeat_s``. A process
that dies (SIGKILL, host lost) stops renewing; its tokens are reaped by the next script any
other process runs (heartbeats run at least every ``heartbeat_s``), so its slots return within
``lease_ttl_s + heartbeat_s``.

The gate's fast path. :meth:`RedisWindow.must_park` answers from local knowledge only: the last
snapshot (limit, holder count and, only while over-committed, the ``holders - limit`` most
recent admission seqs) kept fresh by the ``events`` channel and by every script reply. It also
refuses to vouch for a slot whose lease it could not renew in time: past ``renewed_at +
lease_ttl_s`` (local monotonic clock, measured from when the renewal was *sent*) it returns True,
so the gate gives the slot back and re-queues as a parked agent instead of running on a slot
that may now be someone else's.

Lost leases. When a heartbeat finds that one of this process's held tokens is gone (the process
was paused past its TTL and another process reaped it), the permit is marked ``released``; the
gate sees that at the agent's next step and re-acquires as a parked agent. A waiter whose entry
was reaped is re-queued silently (it loses its place in line). :class:`SlotLostError` is not
raised to callers: a lost slot is an ordinary re-queue.

Redis restarts. Scripts compare the incarnation id stored in ``meta``. A Redis that came back
empty (no persistence) gets a new incarnation on the first script that touches it; each
process's heartbeat notices the change and re-registers what it knows: its holders keep their
slots (new admission seqs, in their old order), its waiters re-queue (in their old order, parked
first), and ``limit`` is restored from the last value the process saw, if no one restored it
first. The process that notices first also sets a recovery grace of one ``lease_ttl_s`` during
which nothing is granted: every live process re-registers its holders within a heartbeat, so
re-registration never over-grants (a waiter of one process cannot take a slot that a holder of
another process has not re-registered yet). Lost for good: FIFO order *across* processes among
waiters, the totals in ``meta``, and grants that were in flight. While Redis is unreachable,
holders keep running until their leases lapse locally, then park; acquires retry for
``reconnect_timeout_s`` before raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from concur_langgraph.checks import check_count
from concur_langgraph.core.window import Permit, WindowStatistics
from concur_langgraph.distributed.keys import batch_key, check_batch_id, import_redis, lua_script
from concur_langgraph.errors import ConfigError, WindowBackendError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisWindow"]

logger = logging.getLogger("concur_langgraph")

_KEY_NAMES = (
    "limit", "seq", "qseq", "holders", "wait:p", "wait:n", "lease", "meta", "leader", "recovering",
)  # fmt: skip


def _script(name: str) -> str:
    """A window script: the shared prelude (``lua/common.lua``: keys, helpers), then its body."""
    return lua_script("common") + lua_script(name)


def _as_list(value: object) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


class _Snapshot:
    __slots__ = ("admitted", "holders", "inc", "limit", "resumed", "ver", "victims", "wn", "wp")

    def __init__(self, data: dict[str, Any]) -> None:
        self.inc: str = data["i"]
        self.ver: int = int(data["v"])
        self.limit: int = int(data["l"])
        self.holders: int = int(data["h"])
        self.wn: int = int(data["wn"])
        self.wp: int = int(data["wp"])
        self.admitted: int = int(data["a"])
        self.resumed: int = int(data["r"])
        self.victims: frozenset[int] = frozenset(int(x) for x in _as_list(data["x"]))


class _Entry:
    """One acquisition as this process tracks it (the Redis token and its lease)."""

    __slots__ = ("agent_id", "future", "lost", "order", "parked", "permit", "registered",
                 "renewed_at", "seq", "token")  # fmt: skip

    def __init__(self, token: str, order: int, agent_id: str, parked: bool) -> None:
        self.token = token
        self.order = order
        self.agent_id = agent_id
        self.parked = parked
        self.future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.permit: Permit | None = None
        self.seq = 0
        # Set once Redis has seen the token (the heartbeat only reports on those).
        self.registered = False
        self.renewed_at = -float("inf")
        self.lost = False


class RedisWindow:
    """An :class:`AdmissionWindow` shared by every process that uses the same Redis and batch.

    Args:
        redis_url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        batch_id: namespace of this batch's keys; processes with the same id share one window.
        initial_limit: the window set when this process is the first to touch the batch (an
            existing window is kept: a restarted worker joins, it does not reset).
        lease_ttl_s: how long a slot outlives its holder's last heartbeat. A dead worker's slots
            return within ``lease_ttl_s + heartbeat_s``; a worker whose event loop stalls longer
            than ``lease_ttl_s - heartbeat_s`` parks its agents. Default 10 s.
        heartbeat_s: renewal period (one script per process, all its tokens); also the fallback
            poll that catches grants whose notification was missed. Default ``lease_ttl_s / 3``.
        reconnect_timeout_s: how long an operation retries while Redis is unreachable before
            raising :class:`WindowBackendError`. Default 30 s.
        op_timeout_s: socket timeout of one Redis call. Default 5 s.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``redis_url`` (not closed
            by :meth:`aclose`).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        batch_id: str,
        initial_limit: int = 4,
        lease_ttl_s: float = 10.0,
        heartbeat_s: float | None = None,
        reconnect_timeout_s: float = 30.0,
        op_timeout_s: float = 5.0,
        client: Redis | None = None,
    ) -> None:
        if (redis_url is None) == (client is None):
            raise ConfigError("redis_url: give exactly one of redis_url or client")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"redis_url must start with redis://, rediss:// or unix://, got {redis_url!r}"
            )
        self._batch_id = check_batch_id(batch_id)
        self._initial_limit = check_count("initial_limit", initial_limit, minimum=1)
        if not lease_ttl_s > 0:
            raise ConfigError(f"lease_ttl_s must be > 0, got {lease_ttl_s!r}")
        if heartbeat_s is None:
            heartbeat_s = lease_ttl_s / 3
        if not 0 < heartbeat_s < lease_ttl_s:
            raise ConfigError(
                f"heartbeat_s must be > 0 and < lease_ttl_s={lease_ttl_s}, got {heartbeat_s!r}"
            )
        if not reconnect_timeout_s >= 0:
            raise ConfigError(f"reconnect_timeout_s must be >= 0, got {reconnect_timeout_s!r}")
        if not op_timeout_s > 0:
            raise ConfigError(f"op_timeout_s must be > 0, got {op_timeout_s!r}")
        self._url = redis_url
        self._client: Redis | None = client
        self._owns_client = client is None
        self.lease_ttl_s = float(lease_ttl_s)
        self.heartbeat_s = float(heartbeat_s)
        self._reconnect_timeout_s = float(reconnect_timeout_s)
        self._op_timeout_s = float(op_timeout_s)
        self._ttl_ms = max(1, round(self.lease_ttl_s * 1000))
        self._keys = [batch_key(self._batch_id, name) for name in _KEY_NAMES]
        self._channel = batch_key(self._batch_id, "events")
        self._client_id = uuid.uuid4().hex[:16]
        self._orders = itertools.count(1)
        self._entries: dict[str, _Entry] = {}
        self._by_permit: dict[int, _Entry] = {}
        self._snap: _Snapshot | None = None
        # Incarnation this process registered its tokens with (see "Redis restarts").
        self._inc: str | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._poke: asyncio.Event | None = None
        self._subscribed: asyncio.Event | None = None
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False

    # -- public surface --------------------------------------------------------------------

    @property
    def batch_id(self) -> str:
        """The batch namespace."""
        return self._batch_id

    @property
    def client(self) -> Redis:
        """The Redis client of this window, once it has connected (the session's leader
        election reuses it: one connection pool per process, failing when the window does)."""
        if self._client is None:
            raise WindowBackendError(f"batch {self._batch_id!r}: the window has not connected")
        return self._client

    @property
    def limit(self) -> int:
        """The window as last seen (a notification or script reply; no I/O)."""
        return self._snap.limit if self._snap is not None else self._initial_limit

    async def set_limit(self, limit: int) -> None:
        """Resize the shared window (unfenced; a controller uses ``Leadership.fence``)."""
        await self.set_limit_fenced(limit, fence=None)

    async def set_limit_fenced(self, limit: int, *, fence: str | None) -> bool:
        """Resize only while the leader key holds ``fence``; False when fenced out."""
        limit = check_count("limit", limit, minimum=1)
        await self._ensure_started()
        # Retrying is safe even when fenced: the fence is checked again, atomically, each time.
        reply = await self._call(
            "set_limit", [self._channel, str(limit), fence or "", self._grace()], retry=True
        )
        if reply.get("fenced"):
            return False
        self._apply(reply)
        return True

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        """Wait for a slot, FIFO across processes, parked agents first.

        Cancellation-safe: a cancelled acquire leaves nothing queued or held in Redis (the
        removal is awaited, shielded; if Redis is unreachable, the token's lease lapses).
        """
        await self._ensure_started()
        order = next(self._orders)
        entry = _Entry(f"{self._client_id}:{order}", order, agent_id, parked)
        self._entries[entry.token] = entry
        register = asyncio.ensure_future(self._register(entry, retry=True))
        try:
            await asyncio.shield(register)
            seq = await entry.future
        except BaseException:
            self._entries.pop(entry.token, None)
            entry.future.cancel()
            cleanup = asyncio.ensure_future(self._abandon(entry, register))
            self._background.add(cleanup)
            cleanup.add_done_callback(self._background.discard)
            with contextlib.suppress(BaseException):
                await asyncio.shield(cleanup)
            raise
        permit = Permit(agent_id, seq, resumed=parked)
        entry.permit = permit
        self._by_permit[id(permit)] = entry
        if entry.lost:
            self._lose(entry)
        return permit

    def must_park(self, permit: Permit) -> bool:
        """Local, O(1): over-committed and among the most recent holders, or lease unvouched."""
        if permit.released:
            return False
        entry = self._by_permit.get(id(permit))
        if entry is None:
            return False
        if time.monotonic() > entry.renewed_at + self.lease_ttl_s:
            return True
        snap = self._snap
        if snap is None or snap.holders <= snap.limit:
            return False
        return entry.seq in snap.victims

    async def release(self, permit: Permit) -> None:
        """Give the slot back; idempotent. If Redis is unreachable the lease lapses instead."""
        if permit.released:
            return
        permit.released = True
        entry = self._by_permit.pop(id(permit), None)
        if entry is None:
            return
        self._entries.pop(entry.token, None)
        try:
            reply = await self._call("release", [self._channel, entry.token], retry=False)
        except WindowBackendError as exc:
            logger.warning(
                "concur: could not release slot of agent %r (%s); its lease lapses in %.1f s",
                permit.agent_id,
                exc,
                self.lease_ttl_s,
            )
            return
        self._apply(reply)

    def statistics(self) -> WindowStatistics:
        """The shared window as last seen (no I/O; ``refresh()`` first for an exact read)."""
        snap = self._snap
        if snap is None:
            return WindowStatistics(
                limit=self._initial_limit,
                holders=0,
                waiting_new=0,
                waiting_parked=0,
                admitted_total=0,
                resumed_total=0,
            )
        return WindowStatistics(
            limit=snap.limit,
            holders=snap.holders,
            waiting_new=snap.wn,
            waiting_parked=snap.wp,
            admitted_total=snap.admitted,
            resumed_total=snap.resumed,
        )

    async def refresh(self) -> WindowStatistics:
        """Renew this process's leases and read the shared state now."""
        await self._ensure_started()
        await self._heartbeat_once()
        return self.statistics()

    async def aclose(self) -> None:
        """Give back every slot and queue entry of this process, stop tasks, close the client."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        entries = list(self._entries.values())
        self._entries.clear()
        self._by_permit.clear()
        for entry in entries:
            if entry.permit is not None:
                entry.permit.released = True
            if not entry.future.done():
                entry.future.set_exception(WindowBackendError("the window was closed"))
                # Retrieved here so an acquire cancelled at the same time does not warn.
                entry.future.exception()
        if entries and self._started:
            with contextlib.suppress(WindowBackendError):
                await self._call(
                    "release", [self._channel, *(e.token for e in entries)], retry=False
                )
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> RedisWindow:
        await self._ensure_started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- plumbing ----------------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._closed:
            raise WindowBackendError("the window was closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            redis_asyncio = import_redis()
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            if self._client is None:
                assert self._url is not None
                # Our own loop retries with a deadline; the client's retry would hide outages.
                self._client = redis_asyncio.Redis.from_url(
                    self._url,
                    socket_timeout=self._op_timeout_s,
                    socket_connect_timeout=self._op_timeout_s,
                    retry=Retry(NoBackoff(), 0),
                )
            client = self._client
            assert client is not None
            self._scripts = {
                "acquire": client.register_script(_script("acquire")),
                "release": client.register_script(_script("release")),
                "set_limit": client.register_script(_script("set_limit")),
                "heartbeat": client.register_script(_script("heartbeat")),
                "reregister": client.register_script(_script("reregister")),
            }
            self._poke = asyncio.Event()
            self._subscribed = asyncio.Event()
            # First contact: creates the batch if needed and learns the incarnation.
            reply = await self._call(
                "heartbeat",
                [self._channel, str(self._initial_limit), str(self._ttl_ms), ""],
                retry=True,
            )
            self._inc = reply["i"]
            self._apply(reply)
            self._tasks = [
                asyncio.create_task(self._listen(), name=f"concur-redis-listen-{self._batch_id}"),
                asyncio.create_task(
                    self._heartbeat_loop(), name=f"concur-redis-hb-{self._batch_id}"
                ),
            ]
            # Grants published before the subscription would be missed until the next
            # heartbeat; waiting for it keeps the first acquisitions prompt.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._op_timeout_s):
                    await self._subscribed.wait()
            self._started = True

    async def _call(self, name: str, args: Sequence[str], *, retry: bool) -> dict[str, Any]:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        script = self._scripts[name]
        deadline = time.monotonic() + self._reconnect_timeout_s
        delay = 0.02
        while True:
            try:
                raw = await script(keys=self._keys, args=list(args))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if not retry or time.monotonic() + delay > deadline:
                    raise WindowBackendError(
                        f"Redis unreachable for the {name} of batch {self._batch_id!r}: {exc}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            except RedisError as exc:
                raise WindowBackendError(
                    f"Redis error in the {name} of batch {self._batch_id!r}: {exc}"
                ) from exc
            result: dict[str, Any] = json.loads(raw)
            return result

    def _apply(self, data: dict[str, Any]) -> None:
        """Take a snapshot (if newer) and resolve this process's grants in it."""
        granted = _as_list(data.get("g"))
        for i in range(0, len(granted) - 1, 2):
            entry = self._entries.get(granted[i])
            if entry is not None and not entry.future.done():
                entry.seq = int(granted[i + 1])
                entry.future.set_result(entry.seq)
        if "l" not in data or not data.get("i"):
            return
        current = self._snap
        if current is None or data["i"] != current.inc or int(data["v"]) >= current.ver:
            self._snap = _Snapshot(data)
        if self._inc is not None and data["i"] != self._inc and self._poke is not None:
            # Redis came back empty (or the batch was wiped): re-register at once.
            self._poke.set()

    def _grace(self) -> str:
        # Only a process that knew an incarnation can tell that Redis lost the batch.
        return str(self._ttl_ms) if self._inc is not None else "0"

    async def _register(self, entry: _Entry, *, retry: bool) -> None:
        sent = time.monotonic()
        reply = await self._call(
            "acquire",
            [
                self._channel,
                str(self.limit),
                str(self._ttl_ms),
                entry.token,
                "1" if entry.parked else "0",
                self._grace(),
            ],
            retry=retry,
        )
        entry.registered = True
        entry.renewed_at = max(entry.renewed_at, sent)
        me = int(reply.get("me", 0))
        if me > 0 and not entry.future.done():
            entry.seq = me
            entry.future.set_result(me)
        self._apply(reply)

    async def _abandon(self, entry: _Entry, register: asyncio.Future[None]) -> None:
        # Let an in-flight registration land first, so the removal cannot overtake it on
        # another pooled connection and leave an orphan queued (bounded by op_timeout_s).
        if not register.done():
            await asyncio.wait({register}, timeout=self._op_timeout_s)
            register.cancel()
        with contextlib.suppress(BaseException):
            register.result()
        with contextlib.suppress(WindowBackendError):
            self._apply(await self._call("release", [self._channel, entry.token], retry=False))

    def _lose(self, entry: _Entry) -> None:
        logger.warning(
            "concur: agent %r lost its slot lease in batch %r (paused longer than "
            "lease_ttl_s=%s?); it re-queues as a parked agent",
            entry.agent_id,
            self._batch_id,
            self.lease_ttl_s,
        )
        self._entries.pop(entry.token, None)
        if entry.permit is not None:
            self._by_permit.pop(id(entry.permit), None)
            entry.permit.released = True

    async def _listen(self) -> None:
        from redis.exceptions import RedisError

        assert self._client is not None and self._subscribed is not None
        delay = 0.05
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                delay = 0.05
                if self._poke is not None:
                    # Catch up on what was published while we were not listening.
                    self._poke.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        self._apply(json.loads(message["data"]))
                    except (ValueError, KeyError, TypeError):
                        # Not ours (another writer on the channel): the heartbeat resyncs.
                        logger.warning("concur: ignored a malformed window notification")
            except (RedisError, OSError) as exc:
                logger.debug("concur: window notifications interrupted (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.heartbeat_s)

    async def _heartbeat_loop(self) -> None:
        assert self._poke is not None
        poke = self._poke
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await poke.wait()
            poke.clear()
            try:
                await self._heartbeat_once()
            except WindowBackendError as exc:
                logger.debug("concur: window heartbeat failed (%s); retrying", exc)
            except (ValueError, KeyError, TypeError):
                # A malformed reply must not end the renewals of every slot of this process.
                logger.exception("concur: unexpected window heartbeat reply; retrying")

    async def _heartbeat_once(self) -> None:
        entries = [e for e in self._entries.values() if e.registered]
        sent = time.monotonic()
        reply = await self._call(
            "heartbeat",
            [
                self._channel,
                str(self.limit),
                str(self._ttl_ms),
                self._inc or "",
                *(e.token for e in entries),
            ],
            retry=False,
        )
        if reply.get("reset"):
            await self._reregister()
            return
        self._inc = reply["i"]
        states = _as_list(reply.get("st"))
        requeue: list[_Entry] = []
        for entry, state in zip(entries, states, strict=False):
            if self._entries.get(entry.token) is not entry:
                continue
            state = int(state)
            if state < 0:
                if entry.permit is not None:
                    self._lose(entry)
                elif entry.future.done():
                    entry.lost = True  # granted, but its acquire has not resumed yet
                else:
                    requeue.append(entry)
                continue
            entry.renewed_at = sent
            if state > 0:
                entry.seq = state
                if entry.permit is not None:
                    entry.permit.seq = state
                if not entry.future.done():
                    entry.future.set_result(state)  # its grant notification was missed
        self._apply(reply)
        for entry in requeue:
            entry.registered = False
            await self._register(entry, retry=False)

    async def _reregister(self) -> None:
        """Redis lost our batch (restart without persistence): put back what we know."""
        entries = sorted(self._entries.values(), key=lambda e: e.order)
        holders = sorted(
            (e for e in entries if e.registered and e.future.done() and not e.lost),
            key=lambda e: e.seq,
        )
        waiters = sorted(
            (e for e in entries if e.registered and not e.future.done()),
            key=lambda e: (not e.parked, e.order),
        )
        sent = time.monotonic()
        args = [self._channel, str(self.limit), str(self._ttl_ms), str(len(holders))]
        args += [e.token for e in holders]
        for e in waiters:
            args += [e.token, "1" if e.parked else "0"]
        reply = await self._call("reregister", args, retry=False)
        logger.warning(
            "concur: Redis lost batch %r; re-registered %d holders and %d waiters",
            self._batch_id,
            len(holders),
            len(waiters),
        )
        self._inc = reply["i"]
        for entry, seq in zip(holders, _as_list(reply.get("hs")), strict=False):
            # New admission seqs, same order: Permit.seq keeps meaning "admission order".
            entry.seq = int(seq)
            if entry.permit is not None:
                entry.permit.seq = entry.seq
            entry.renewed_at = sent
        for entry in waiters:
            entry.renewed_at = sent
        self._apply(reply)

"""Controller leadership for a distributed batch: exactly one process drives the window.

Every worker of a batch runs a :class:`Leadership` campaign on the batch's Redis. The leader key
``concur:{BATCH}:leader`` holds ``OWNER|EPOCH`` with a TTL of ``ttl_s``; the holder renews it
every ``renew_s``, the others try to take it on the same period. Taking it increments the
batch's epoch counter, so every reign has its own fencing token.

Fencing. The leader's controller resizes the window through :meth:`Leadership.fence`, whose
``set_limit`` runs the window's resize script only if the leader key still holds this reign's
token, checked inside the same atomic script. A deposed leader (paused past ``ttl_s``, or cut
off from Redis) therefore cannot overwrite its successor's window, however late its write
arrives; a fenced-out write is dropped and the campaign marks itself not-leader.

Takeover. When the leader dies its key expires after at most ``ttl_s``; a follower takes it at
its next attempt, within ``ttl_s + renew_s`` of the last renewal. The new leader's controller
starts from the window stored in Redis (read it with ``await window.refresh()``), not from its
own initial window. A leader that exits cleanly deletes the key, so the hand-over takes at most
``renew_s``. After a Redis restart without persistence the epoch counter restarts too; tokens
stay unique because they carry the owner id.

Bounded slack: the old leader's *local* ``is_leader`` may stay True for up to one renewal after
it lost the key in Redis, but its writes are fenced, so the window has one writer at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any

from concur_langgraph.core.window import Permit, WindowStatistics
from concur_langgraph.distributed.keys import batch_key, check_batch_id, import_redis, lua_script
from concur_langgraph.distributed.redis_window import RedisWindow
from concur_langgraph.errors import ConfigError, WindowBackendError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["FencedWindow", "Leadership"]

logger = logging.getLogger("concur_langgraph")


class Leadership:
    """A lease-based leader election among the workers of one batch.

    ``async with Leadership(url, batch_id=...) as lead:`` campaigns in the background;
    ``lead.is_leader`` says whether this process leads now, ``await lead.wait_leader()`` and
    ``await lead.wait_lost()`` wait for the transitions, and ``lead.fence(window)`` gives the
    window the controller must use (its ``set_limit`` is fenced by this reign's token).

    Args:
        redis_url: the Redis of the batch (or pass ``client``).
        batch_id: the batch; one leader per batch.
        ttl_s: the leader lease. A dead leader is replaced within ``ttl_s + renew_s``.
        renew_s: renewal / campaign period. Default ``ttl_s / 3``.
        owner: a name for this process in the leader key (default: a random id).
        client: an existing ``redis.asyncio.Redis`` (not closed on exit).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        batch_id: str,
        ttl_s: float = 5.0,
        renew_s: float | None = None,
        owner: str | None = None,
        client: Redis | None = None,
    ) -> None:
        if (redis_url is None) == (client is None):
            raise ConfigError("redis_url: give exactly one of redis_url or client")
        self._batch_id = check_batch_id(batch_id)
        if not ttl_s > 0:
            raise ConfigError(f"ttl_s must be > 0, got {ttl_s!r}")
        if renew_s is None:
            renew_s = ttl_s / 3
        if not 0 < renew_s < ttl_s:
            raise ConfigError(f"renew_s must be > 0 and < ttl_s={ttl_s}, got {renew_s!r}")
        if owner is not None and (not owner or "|" in owner):
            raise ConfigError(f"owner must be a non-empty string without '|', got {owner!r}")
        self._url = redis_url
        self._client: Redis | None = client
        self._owns_client = client is None
        self.ttl_s = float(ttl_s)
        self.renew_s = float(renew_s)
        self.owner = owner or uuid.uuid4().hex[:16]
        self._key = batch_key(self._batch_id, "leader")
        self._epoch_key = batch_key(self._batch_id, "leader_epoch")
        self._token: str | None = None
        self._valid_until = -float("inf")
        self._task: asyncio.Task[None] | None = None
        self._became_leader: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        self._campaign_script: Any = None
        self._resign_script: Any = None
        self.terms = 0
        """How many times this process became leader."""

    @property
    def is_leader(self) -> bool:
        """Whether this process holds the leader lease now (by its own clock; no I/O)."""
        return self._token is not None and time.monotonic() < self._valid_until

    @property
    def token(self) -> str | None:
        """The fencing token ``OWNER|EPOCH`` of the current reign, or None."""
        return self._token if self.is_leader else None

    @property
    def epoch(self) -> int | None:
        """The epoch of the current reign (increases with every new leader), or None."""
        token = self.token
        return int(token.rsplit("|", 1)[1]) if token is not None else None

    async def wait_leader(self) -> None:
        """Return once this process is the leader."""
        assert self._became_leader is not None, "use `async with Leadership(...)`"
        while not self.is_leader:
            await self._became_leader.wait()
            self._became_leader.clear()

    async def wait_lost(self) -> None:
        """Return once this process is no longer the leader (at once if it is not)."""
        assert self._lost is not None, "use `async with Leadership(...)`"
        while self.is_leader:
            with contextlib.suppress(TimeoutError):
                # The lease can also lapse locally without any event (Redis unreachable).
                async with asyncio.timeout(max(self._valid_until - time.monotonic(), 0.0)):
                    await self._lost.wait()
            self._lost.clear()

    def fence(self, window: RedisWindow) -> FencedWindow:
        """The window as this process's controller must see it: ``set_limit`` is fenced."""
        return FencedWindow(window, self)

    async def __aenter__(self) -> Leadership:
        if self._client is None:
            assert self._url is not None
            # A call that hangs longer than the lease is worthless: the lease is gone anyway.
            self._client = import_redis().Redis.from_url(
                self._url, socket_timeout=self.ttl_s, socket_connect_timeout=self.ttl_s
            )
        assert self._client is not None
        self._campaign_script = self._client.register_script(lua_script("leader_campaign"))
        self._resign_script = self._client.register_script(lua_script("leader_resign"))
        self._became_leader = asyncio.Event()
        self._lost = asyncio.Event()
        await self._campaign_once()
        self._task = asyncio.create_task(self._campaign(), name=f"concur-leader-{self._batch_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        token, self._token = self._token, None
        if token is not None:
            from redis.exceptions import RedisError

            # A clean exit hands over at once instead of after the lease.
            with contextlib.suppress(RedisError, OSError):
                await self._resign_script(keys=[self._key], args=[token])
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    def _demote(self) -> None:
        if self._token is not None:
            logger.warning(
                "concur: %s is no longer the leader of batch %r", self.owner, self._batch_id
            )
        self._token = None
        if self._lost is not None:
            self._lost.set()

    async def _campaign_once(self) -> None:
        from redis.exceptions import RedisError

        sent = time.monotonic()
        try:
            raw = await self._campaign_script(
                keys=[self._key, self._epoch_key],
                args=[self.owner, str(max(1, round(self.ttl_s * 1000)))],
            )
        except (RedisError, OSError) as exc:
            logger.debug("concur: leader campaign for %r failed: %s", self._batch_id, exc)
            if self._token is not None and time.monotonic() >= self._valid_until:
                self._demote()
            return
        if raw is None:
            self._demote()
            return
        token = raw.decode() if isinstance(raw, bytes) else str(raw)
        if token != self._token:
            self.terms += 1
            logger.info("concur: %s leads batch %r (token %s)", self.owner, self._batch_id, token)
        self._token = token
        self._valid_until = sent + self.ttl_s
        assert self._became_leader is not None
        self._became_leader.set()

    async def _campaign(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            await self._campaign_once()


class FencedWindow:
    """A :class:`RedisWindow` whose ``set_limit`` only lands while its leadership holds."""

    def __init__(self, window: RedisWindow, leadership: Leadership) -> None:
        self.window = window
        self.leadership = leadership
        self.fenced_out = 0
        """How many resizes were dropped because this process was no longer the leader."""

    @property
    def limit(self) -> int:
        return self.window.limit

    async def set_limit(self, limit: int) -> None:
        token = self.leadership.token
        try:
            landed = token is not None and await self.window.set_limit_fenced(limit, fence=token)
        except WindowBackendError as exc:
            # Redis unreachable past reconnect_timeout_s: the resize is dropped, the controller
            # keeps ticking, and the lease decides who leads once Redis is back.
            logger.warning("concur: window resize to %d dropped: %s", limit, exc)
            return
        if not landed:
            self.fenced_out += 1
            self.leadership._demote()

    async def acquire(self, agent_id: str, *, parked: bool = False) -> Permit:
        return await self.window.acquire(agent_id, parked=parked)

    def must_park(self, permit: Permit) -> bool:
        return self.window.must_park(permit)

    async def release(self, permit: Permit) -> None:
        await self.window.release(permit)

    def statistics(self) -> WindowStatistics:
        return self.window.statistics()

    async def aclose(self) -> None:
        # The window belongs to the session, not to the controller's view of it.
        return None

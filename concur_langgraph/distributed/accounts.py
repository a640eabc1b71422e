"""Every worker's agent accounts in Redis, merged for the leader's law.

``FitLaw`` sizes the window from the gate's account of each agent's context. On a shared
window the agents are spread over the workers and each gate knows only its own, so each worker
publishes its gate's accounts and the leader reads them all back::

    acct          set     the workers that published (their tokens)
    acct:TOKEN    string  one worker's accounts (JSON), expiring after ``ttl_s``

Every ``interval_s`` a worker writes its accounts with a fresh expiry; a worker that dies stops
writing, and its key expires within ``ttl_s`` (its agents' slots are reaped by their own
leases, docs/distributed.md). The leader reads every worker's key in one ``MGET``, drops the
tokens whose key has expired, and merges: agents holding a slot in their global admission order
(a :class:`RedisWindow` permit's ``seq`` comes from the batch's shared admission counter, so it
is comparable across workers), then parked agents, then new ones, each group by its worker's
arrival order. The merged list is what :meth:`SharedAccounts.accounts` returns; the controller
reads it each tick, synchronously, at most one interval old. Nothing here touches the gate's
fast path: the accounts are read from the gate at publish time, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from concur_langgraph.checks import check_number
from concur_langgraph.core.gate import AgentAccount
from concur_langgraph.distributed.keys import batch_key

__all__ = ["SharedAccounts", "merge_accounts"]

logger = logging.getLogger("concur_langgraph")

_STATES = {"active": 0, "parked": 1, "waiting": 2}
_FIELDS = tuple(f.name for f in dataclasses.fields(AgentAccount))


def merge_accounts(workers: Sequence[Sequence[AgentAccount]]) -> list[AgentAccount]:
    """Several workers' accounts as one batch's, in admission order (module docstring)."""
    merged = [account for accounts in workers for account in accounts]
    # sorted() is stable: within a state and an order, workers keep the order they came in.
    return sorted(merged, key=lambda a: (_STATES.get(a.state, len(_STATES)), a.order))


def encode(accounts: Sequence[AgentAccount]) -> str:
    """The JSON one worker publishes: one list of field values per agent."""
    return json.dumps([[getattr(a, name) for name in _FIELDS] for a in accounts])


def decode(text: str | bytes) -> list[AgentAccount]:
    """:func:`encode`'s inverse; a value that is not a worker's accounts is an empty list."""
    try:
        rows = json.loads(text)
        return [AgentAccount(**dict(zip(_FIELDS, row, strict=True))) for row in rows]
    except (TypeError, ValueError) as exc:
        logger.warning("concur: dropped an unreadable accounts entry in Redis: %s", exc)
        return []


class SharedAccounts:
    """Publishes this worker's accounts and, while asked to, collects every worker's.

    Args:
        client: a ``redis.asyncio.Redis`` (the window's).
        batch_id: the batch.
        local: this worker's accounts (``Gate.accounting``).
        interval_s: how often to publish (and collect): the controller's tick.
        ttl_s: how long a published entry outlives its last write; ``None`` is
            ``max(1.0, 5 * interval_s)``.
    """

    def __init__(
        self,
        client: Any,
        batch_id: str,
        local: Callable[[], Sequence[AgentAccount]],
        *,
        interval_s: float,
        ttl_s: float | None = None,
    ) -> None:
        check_number("interval_s", interval_s, low=0, low_open=True)
        ttl = max(1.0, 5 * interval_s) if ttl_s is None else ttl_s
        check_number("ttl_s", ttl, low=interval_s, low_name="interval_s")
        self._client = client
        self._local = local
        self._interval_s = interval_s
        self._ttl_ms = max(1, round(ttl * 1000))
        self._set = batch_key(batch_id, "acct")
        self.token = uuid.uuid4().hex
        self._key = self._entry(self.token)
        self._batch_id = batch_id
        self._merged: list[AgentAccount] = []
        self._collect = False
        self._task: asyncio.Task[None] | None = None

    def _entry(self, token: str) -> str:
        return f"{self._set}:{token}"

    def accounts(self) -> list[AgentAccount]:
        """The batch's accounts as last collected, merged; this worker's own until the first
        collection (or when not collecting)."""
        return self._merged if self._collect else list(self._local())

    async def start_collecting(self) -> None:
        """Collect every interval from now on (this process leads); collects once at once."""
        self._collect = True
        await self.collect()

    def stop_collecting(self) -> None:
        """Stop collecting (this process no longer leads)."""
        self._collect = False
        self._merged = []

    async def publish(self) -> None:
        """Write this worker's accounts with a fresh expiry."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._key, encode(self._local()), px=self._ttl_ms)
            pipe.sadd(self._set, self.token)
            pipe.pexpire(self._set, self._ttl_ms)
            await pipe.execute()

    async def collect(self) -> list[AgentAccount]:
        """Read and merge every live worker's accounts; forget the workers whose entry
        expired."""
        tokens = sorted(
            t.decode() if isinstance(t, bytes) else str(t)
            for t in await self._client.smembers(self._set)
        )
        values = await self._client.mget([self._entry(t) for t in tokens]) if tokens else []
        gone = [t for t, v in zip(tokens, values, strict=True) if v is None]
        if gone:
            await self._client.srem(self._set, *gone)
        self._merged = merge_accounts([decode(v) for v in values if v is not None])
        return self._merged

    async def __aenter__(self) -> SharedAccounts:
        await self.publish()
        self._task = asyncio.create_task(self._run(), name=f"concur-accounts-{self._batch_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(self._key)
                pipe.srem(self._set, self.token)
                await pipe.execute()
        except Exception as exc:  # the entry expires by itself
            logger.warning("concur: could not remove this worker's accounts: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.publish()
                if self._collect:
                    await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis is away: the window itself reports it; the leader's law keeps the
                # accounts it last saw, which is what it would do on stale signals.
                logger.warning("concur: the agents' accounts could not be shared: %s", exc)

"""Replicas shared by worker processes: the list, each agent's placement, the dead ones.

With several replicas and ``redis_url``, every worker runs a :class:`ReplicaGate` whose
per-replica windows live in Redis (one shared window, leader and accounts per replica, under
``replica_batch_id``), and these keys of the batch hold what the workers must agree on:

* ``concur:{BATCH}:replicas``: the replicas' URLs, in order, as the first worker wrote them. A
  worker that lists other URLs (or another order) is refused at entry: replica ``i`` must be
  the same server for everyone, or placements and windows would mean different things.
* ``concur:{BATCH}:place``: agent id -> replica index, written when a worker places an agent
  and deleted when its run ends. A worker that dies leaves its agents' placements behind, so a
  worker that resumes one of them (a durable batch) sends it back to its replica, where its
  prefix is, ahead of new agents.
* ``concur:{BATCH}:dead``: the replicas some worker found dead; the others read it every
  quarter interval and re-place their agents too.

The keys expire a day after their last write, so a batch that is abandoned leaves nothing
behind for long; a batch that runs longer rewrites them with every placement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from concur_langgraph.distributed.keys import batch_key
from concur_langgraph.distributed.redis_window import RedisWindow
from concur_langgraph.errors import ConfigError

__all__ = ["RedisPlacements"]

KEY_TTL_S = 24 * 3600
"""How long the replica keys outlive their last write (an abandoned batch's are gone a day
later; a live batch rewrites them with every placement)."""


class RedisPlacements:
    """The replica keys of one batch (see the module docstring).

    Args:
        window: one of the batch's windows: its Redis client is used (one pool per process).
        batch_id: the batch.
        urls: this worker's replicas, in order.
    """

    def __init__(self, window: RedisWindow, batch_id: str | None, urls: Sequence[str]) -> None:
        assert batch_id is not None
        self._window = window
        self._batch_id = batch_id
        self._urls = list(urls)
        self._list = batch_key(batch_id, "replicas")
        self._place = batch_key(batch_id, "place")
        self._dead = batch_key(batch_id, "dead")

    @property
    def _client(self) -> Any:
        return self._window.client

    async def join(self) -> None:
        """Check this worker's replicas against the batch's (the first worker sets them)."""
        await self._window.refresh()  # connects
        mine = json.dumps(self._urls)
        await self._client.set(self._list, mine, nx=True, ex=KEY_TTL_S)
        stored = await self._client.get(self._list)
        theirs = stored.decode() if isinstance(stored, bytes) else str(stored)
        if theirs != mine:
            raise ConfigError(
                f"vllm_url: batch {self._batch_id!r} runs on the replicas {json.loads(theirs)}, "
                f"in that order; this worker lists {self._urls}: every worker of a batch must "
                "list the same replicas in the same order"
            )

    async def get(self, agent_id: str) -> int | None:
        value = await self._client.hget(self._place, agent_id)
        return None if value is None else int(value)

    async def put(self, agent_id: str, index: int) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(self._place, agent_id, index)
            pipe.expire(self._place, KEY_TTL_S)
            pipe.expire(self._list, KEY_TTL_S)
            await pipe.execute()

    async def forget(self, agent_id: str) -> None:
        await self._client.hdel(self._place, agent_id)

    async def mark_dead(self, index: int) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.sadd(self._dead, index)
            pipe.expire(self._dead, KEY_TTL_S)
            await pipe.execute()

    async def dead(self) -> set[int]:
        return {int(v) for v in await self._client.smembers(self._dead)}

"""The paged KV cache: a pool of fixed-size blocks with vLLM V1's prefix caching.

What it reproduces (vllm/v1/core/block_pool.py, kv_cache_utils.py):

* Only FULL blocks are cached. A block's hash chains the parent block's hash with the block's
  token ids, so a hit on block ``i`` implies the whole prefix up to it matches.
* Free blocks sit in one queue in LRU order. A freed block keeps its hash and keeps producing
  hits until it is handed out again; handing it out evicts the hash (plain LRU eviction).
* Callers free a request's blocks tail first, so the shared head of a prompt is evicted last.
* A block referenced by several running requests has a reference count; it returns to the free
  queue only when the last reference goes.
* ``usage`` is vLLM's ``kv_cache_usage_perc``: blocks referenced by live requests over all
  blocks. Cached blocks that no request references are free.

Duplicates: if a block is filled with content whose hash is already cached (two requests
computed the same prefix at once), the second block stays unhashed and is never hit, where
vLLM would index both; only hit counts in such races can differ.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import partial
from itertools import takewhile
from operator import is_not

__all__ = ["ROOT_HASH", "BlockPool", "hash_block"]

ROOT_HASH = 0x5EED_0F_B10C5
"""Parent hash of a sequence's first block."""


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    """Hash of a full block: chains ``parent`` with the block's token ids.

    Python's ``hash`` of a tuple of ints is deterministic across processes (hash randomisation
    only affects str and bytes), so timelines are reproducible.
    """
    return hash((parent, tuple(tokens)))


_IS_BLOCK = partial(is_not, None)


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens, with prefix caching."""

    __slots__ = (
        "_block_hash",
        "_cached",
        "_free",
        "_ref",
        "block_size",
        "enable_caching",
        "evictions",
        "num_blocks",
        "version",
    )

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        # Head = least recently freed = next to be handed out.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.evictions = 0
        """Cached blocks whose hash was dropped because the block was handed out again."""
        self.version = 0
        """Bumped on every change that can alter an allocation or lookup outcome."""

    @property
    def num_free(self) -> int:
        """Blocks no live request references (cached or not)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks currently holding a hash (referenced or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: referenced blocks / all blocks."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def ref_count(self, block: int) -> int:
        """References held on ``block`` by live requests."""
        return self._ref[block]

    def is_cached(self, block_hash: int) -> bool:
        """Whether some block holds content with this hash."""
        return block_hash in self._cached

    def lookup(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached prefix of ``block_hashes`` (at most ``max_blocks``)."""
        if not self.enable_caching:
            return []
        # The hit prefix is contiguous: stop at the first miss (all in C, no Python loop).
        return list(
            takewhile(_IS_BLOCK, map(self._cached.get, block_hashes[:max_blocks]))  # type: ignore[arg-type]
        )

    def num_evictable(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` sit in the free queue (touching them uses up free blocks)."""
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        ref = self._ref
        free = self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1
        self.version += 1

    def allocate(self, n: int) -> list[int] | None:
        """Hand out ``n`` blocks from the head of the free queue, or ``None`` if too few."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pop = self._free.popitem
        ref = self._ref
        block_hash = self._block_hash
        out = [pop(last=False)[0] for _ in range(n)]
        for b in out:
            ref[b] = 1
            h = block_hash[b]
            if h is not None:
                # Handing out a cached block evicts its content.
                if self._cached.get(h) == b:
                    del self._cached[h]
                block_hash[b] = None
                self.evictions += 1
        self.version += 1
        return out

    def cache(self, block: int, block_hash: int) -> None:
        """Record that ``block`` is full and holds content with ``block_hash``."""
        if not self.enable_caching or self._block_hash[block] is not None:
            return
        if block_hash in self._cached:
            return
        self._cached[block_hash] = block
        self._block_hash[block] = block_hash
        self.version += 1

    def cache_many(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """:meth:`cache` for each (block, hash) pair."""
        if not self.enable_caching:
            return
        cached = self._cached
        block_hash = self._block_hash
        for b, h in zip(blocks, hashes, strict=True):
            if block_hash[b] is None and h not in cached:
                cached[h] = b
                block_hash[b] = h
        self.version += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block, tail first; unreferenced ones join the free queue.

        Tail first: the last block of the sequence enters the queue first and so is evicted
        first, and the shared head survives longest (vLLM's ``free`` does the same).
        """
        ref = self._ref
        free = self._free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                free[b] = None
        self.version += 1

"""The paged KV block pool: prefix caching, LRU eviction, ref counts, usage semantics."""

from __future__ import annotations

from concur_langgraph.sim._kv import ROOT_HASH, BlockPool, hash_block

BS = 4


def chain(tokens: list[int]) -> list[int]:
    """Hashes of the full blocks of ``tokens``."""
    out: list[int] = []
    parent = ROOT_HASH
    for a in range(0, len(tokens) - len(tokens) % BS, BS):
        parent = hash_block(parent, tokens[a : a + BS])
        out.append(parent)
    return out


def fill(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate and cache blocks for ``tokens`` as a request would."""
    hashes = chain(tokens)
    blocks = pool.allocate(-(-len(tokens) // BS))
    assert blocks is not None
    pool.cache_many(blocks[: len(hashes)], hashes)
    return blocks


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    a = chain([1, 2, 3, 4, 5, 6, 7, 8])
    b = chain([9, 2, 3, 4, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different first block
    assert chain([1, 2, 3, 4, 5, 6, 7, 8, 9]) == a  # the partial block is not hashed


def test_freed_blocks_keep_giving_hits_until_reused() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(100, 112))  # 3 full blocks
    blocks = fill(pool, tokens)
    pool.free(blocks)
    assert pool.num_free == 8
    assert pool.lookup(chain(tokens), 10) == blocks
    # Hand out every free block: the cached content is evicted.
    other = pool.allocate(8)
    assert other is not None
    assert pool.lookup(chain(tokens), 10) == []
    assert pool.evictions == 3


def test_lookup_stops_at_first_miss_and_respects_the_limit() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(16))
    blocks = fill(pool, tokens)
    query = chain([*tokens[:8], 99, 99, 99, 99, *tokens[12:]])
    assert pool.lookup(query, 10) == blocks[:2]
    assert pool.lookup(chain(tokens), 1) == blocks[:1]


def test_blocks_are_freed_tail_first_so_the_head_survives_longest() -> None:
    pool = BlockPool(4, BS)
    tokens = list(range(16))  # 4 full blocks, the whole pool
    blocks = fill(pool, tokens)
    pool.free(blocks)
    new = pool.allocate(1)
    assert new == [blocks[-1]]  # the tail block is reused first
    assert pool.lookup(chain(tokens), 4) == blocks[:3]  # the head still hits


def test_eviction_is_lru_over_freeing_order() -> None:
    pool = BlockPool(4, BS)
    first = fill(pool, [1] * 8)
    second = fill(pool, [2] * 8)
    pool.free(first)
    pool.free(second)
    assert pool.allocate(2) == list(reversed(first))
    assert pool.lookup(chain([1] * 8), 2) == []
    assert pool.lookup(chain([2] * 8), 2) == second


def test_shared_blocks_are_ref_counted() -> None:
    pool = BlockPool(4, BS)
    tokens = list(range(8))
    blocks = fill(pool, tokens)
    hits = pool.lookup(chain(tokens), 2)
    assert pool.num_evictable(hits) == 0  # held by the first request
    pool.touch(hits)  # a second request shares them
    assert pool.ref_count(blocks[0]) == 2
    pool.free(blocks)
    assert pool.num_free == 2  # still referenced by the second request
    assert pool.usage == 0.5
    pool.free(hits)
    assert pool.num_free == 4
    assert pool.usage == 0.0


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue() -> None:
    pool = BlockPool(4, BS)
    tokens = list(range(8))
    blocks = fill(pool, tokens)
    pool.free(blocks)
    hits = pool.lookup(chain(tokens), 2)
    assert pool.num_evictable(hits) == 2
    pool.touch(hits)
    assert pool.num_free == 2
    assert pool.allocate(3) is None
    assert sorted(pool.allocate(2) or []) == sorted(set(range(4)) - set(blocks))


def test_usage_counts_only_referenced_blocks() -> None:
    pool = BlockPool(10, BS)
    blocks = fill(pool, list(range(20)))  # 5 blocks
    assert pool.usage == 0.5
    pool.free(blocks)
    # Cached but unreferenced blocks count as free, as in vLLM's kv_cache_usage_perc.
    assert pool.usage == 0.0
    assert pool.num_cached == 5


def test_caching_disabled_gives_no_hits() -> None:
    pool = BlockPool(4, BS, enable_caching=False)
    tokens = list(range(8))
    blocks = fill(pool, tokens)
    pool.free(blocks)
    assert pool.lookup(chain(tokens), 2) == []
    assert pool.num_cached == 0


def test_a_duplicate_content_block_is_not_indexed_twice() -> None:
    pool = BlockPool(4, BS)
    tokens = list(range(4))
    a = fill(pool, tokens)
    b = fill(pool, tokens)
    assert pool.lookup(chain(tokens), 1) == a
    pool.free(a)
    pool.free(b)
    assert pool.num_cached == 1

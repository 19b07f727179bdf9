"""Automatic prefix caching in the block manager: chained hashes, exact matches under
collisions, sharing and refcounts, LRU eviction under pressure, admission accounting."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.core.block_manager import AllocStatus, BlockManager, prefix_block_hashes

BS = 8


def tokens(*blocks: int, tail: int = 1) -> list[int]:
    """One block of BS tokens per value (all equal to it), then `tail` tokens of 1000."""
    return [v for b in blocks for v in [b] * BS] + [1000] * tail


def cached_manager(num_blocks: int = 16, hash_bits: int = 64) -> BlockManager:
    return BlockManager(num_blocks, BS, 0.0, enable_prefix_caching=True, hash_bits=hash_bits)


def run(bm: BlockManager, request_id: int, token_ids: list[int]) -> int:
    """Admits a request, 'computes' all of its tokens, registers its blocks. Returns the
    tokens found cached."""
    cached = bm.allocate(request_id, len(token_ids), token_ids)
    bm.cache_blocks(request_id, token_ids, len(token_ids))
    bm.check_invariants()
    return cached


def test_hashes_chain_over_the_parent_and_the_extra_key():
    a, b = prefix_block_hashes(tokens(1, 2), BS), prefix_block_hashes(tokens(3, 2), BS)
    assert len(a) == 2 and a.dtype == np.uint64
    assert a[1] != b[1]  # same tokens in block 1, different parent
    assert (prefix_block_hashes(tokens(1, 2), BS) == a).all()  # deterministic
    assert prefix_block_hashes(tokens(1), BS, extra_key=7)[0] != a[0]
    assert len(prefix_block_hashes([5] * (BS - 1), BS)) == 0  # no full block


def test_same_block_after_a_different_prefix_is_not_shared():
    bm = cached_manager()
    assert run(bm, 1, tokens(1, 2)) == 0
    assert run(bm, 2, tokens(3, 2)) == 0
    assert set(bm.block_table(1)).isdisjoint(bm.block_table(2))
    assert bm.num_cached_blocks == 4


def test_shared_prefix_is_reused_and_refcounted():
    bm = cached_manager()
    run(bm, 1, tokens(1, 2, 3))
    assert run(bm, 2, tokens(1, 2, 9)) == 2 * BS
    assert (bm.block_table(2)[:2] == bm.block_table(1)[:2]).all()
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    assert list(bm.refcounts()[bm.block_table(1)[:3]]) == [2, 2, 1]
    stats = bm.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (2 * (3 * BS + 1), 2 * BS)
    bm.free(1)
    bm.free(2)
    bm.check_invariants()
    assert (bm.refcounts() == 0).all() and bm.num_free_blocks == bm.num_blocks


def test_last_token_is_always_computed_in_a_block_of_its_own():
    bm = cached_manager()
    run(bm, 1, tokens(1, 2, tail=0))
    # The same two full blocks again: the last token's block is recomputed, not shared,
    # so nothing ever writes into a shared block.
    assert run(bm, 2, tokens(1, 2, tail=0)) == BS
    assert bm.block_table(2)[1] != bm.block_table(1)[1]


@pytest.mark.parametrize("hash_bits", [64, 1])
def test_collisions_never_return_another_prefix(hash_bits):
    # hash_bits=1: every block lands in one of two buckets; only exact matches may hit.
    bm = cached_manager(32, hash_bits)
    for i, first in enumerate(range(1, 6)):
        run(bm, i, tokens(first, 7, 8))
    for i in range(5):
        bm.free(i)
    assert run(bm, 10, tokens(4, 7, 9)) == 2 * BS
    assert run(bm, 11, tokens(6, 7, 8)) == 0
    assert run(bm, 12, tokens(2, 7, 8)) == 3 * BS


def test_registration_waits_for_the_computed_tokens():
    bm = cached_manager()
    t = tokens(1, 2, 3)
    bm.allocate(1, len(t), t)
    bm.cache_blocks(1, t, BS + 3)  # only block 0 is written and full
    assert bm.num_cached_blocks == 1
    assert run(bm, 2, t) == BS
    with pytest.raises(ValueError, match=r"num_computed_tokens must be in \[0, num_tokens = 25\]"):
        bm.cache_blocks(1, t, 26)
    with pytest.raises(ValueError, match="token_ids must hold at least 25 tokens, got 3"):
        bm.cache_blocks(1, t[:3], 25)
    with pytest.raises(ValueError, match=r"token_ids\[0\] must be in \[0, 2\*\*31 - 1\], got -1"):
        bm.allocate(3, 2, [-1, 4])


def test_eviction_under_pressure_is_lru_and_keeps_blocks_conserved():
    bm = cached_manager(num_blocks=6)
    run(bm, 1, tokens(1, 2, tail=0))  # 2 blocks, both cached
    run(bm, 2, tokens(3, 4, tail=0))
    bm.free(2)  # freed first: evicted first
    bm.free(1)
    # Freed tail first: a prompt's last block goes before its first.
    evictable = list(bm.evictable_blocks())
    assert len(evictable) == 4 and bm.num_free_blocks == 6
    # 2 never-cached blocks are used first, then the LRU head (request 2's last block).
    run(bm, 3, tokens(5, tail=BS + 1))  # 3 blocks: 2 fresh + 1 evicted
    assert bm.num_cached_blocks == 5  # 4 cached - 1 evicted + request 3's 2 full blocks
    assert list(bm.evictable_blocks()) == evictable[1:]
    bm.free(3)
    assert run(bm, 4, tokens(1, 2, tail=1)) == 2 * BS  # request 1's prefix survived
    assert run(bm, 5, tokens(3, 4, tail=1)) == BS  # request 2's last block was evicted
    bm.check_invariants()


def test_admission_counts_hits_and_the_free_blocks_they_take():
    bm = cached_manager(num_blocks=4)
    run(bm, 1, tokens(1, 2, 3, tail=0))  # 3 blocks
    # A 3-block prompt does not fit the 1 block left, unless its first 2 blocks are cached.
    assert bm.can_allocate(2 * BS + 5) is AllocStatus.LATER
    assert bm.can_allocate(2 * BS + 5, tokens(1, 2, tail=5)) is AllocStatus.OK
    assert bm.can_allocate(2 * BS + 5, tokens(1, 4, tail=5)) is AllocStatus.LATER
    bm.free(1)
    # Now every block is free (3 evictable); hits on evictable blocks are no longer free.
    assert bm.can_allocate(4 * BS, tokens(1, 2, 3, 4, tail=0)) is AllocStatus.OK
    assert run(bm, 2, tokens(1, 2, 3, 4, tail=0)) == 3 * BS
    assert bm.num_free_blocks == 0
    assert bm.can_allocate(BS, tokens(1, tail=0)) is AllocStatus.LATER


def test_fork_shares_the_cache_position():
    bm = cached_manager()
    t = tokens(1, 2, tail=3)
    bm.allocate(1, len(t), t)
    bm.cache_blocks(1, t, BS)
    bm.fork(1, 2)
    bm.cache_blocks(2, t, 2 * BS)
    bm.cache_blocks(1, t, 2 * BS)  # finds the block its fork registered: no duplicate
    assert bm.num_cached_blocks == 2
    bm.check_invariants()


def test_caching_off_ignores_token_ids():
    bm = BlockManager(8, BS, 0.0)
    assert not bm.enable_prefix_caching
    assert run(bm, 1, tokens(1, 2)) == 0
    assert run(bm, 2, tokens(1, 2)) == 0
    assert bm.num_cached_blocks == 0 and bm.stats().prefix_cache_queries == 0
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool, got 1"):
        BlockManager(8, BS, 0.0, enable_prefix_caching=1)
    with pytest.raises(ValueError, match=r"hash_bits must be in \[1, 64\], got 0"):
        BlockManager(8, BS, 0.0, enable_prefix_caching=True, hash_bits=0)


def test_registration_takes_only_the_unregistered_tail():
    bm = cached_manager()
    t = tokens(1, 2, 3)
    bm.allocate(1, len(t), t)
    bm.cache_blocks(1, t[:BS], BS)  # block 0, as a first chunk would
    bm.cache_blocks(1, t[BS : 2 * BS], 2 * BS, start=BS)  # block 1, as a decode would
    assert bm.num_cached_blocks == 2
    bm.cache_blocks(1, t[3 * BS : 3 * BS], 3 * BS, start=3 * BS)  # would skip block 2
    assert bm.num_cached_blocks == 2  # nothing: a chain cannot skip a block
    assert run(bm, 2, t) == 2 * BS
    with pytest.raises(ValueError, match=r"start must be a multiple of block_size \(8\)"):
        bm.cache_blocks(1, t, 3 * BS, start=3)

"""Unit tests of BlockManager: every method, every error, copy-on-write and the batch calls.

Expected block tables and slots are computed here from first principles (a fresh pool hands
out blocks 0, 1, 2, ... and slot = block * block_size + offset); the randomised sequences
live in test_block_manager_stateful.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distserve_rt import _C
from distserve_rt.core.block_manager import (
    AllocStatus,
    AppendResult,
    BlockManager,
    BlockManagerStats,
)

BLOCK_SIZES = [8, 16, 32]


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable about the pool (these tests use request ids 0..19), to assert
    that a failed call changed nothing."""
    tables = {
        rid: (bm.block_table(rid).tolist(), bm.num_tokens(rid)) for rid in range(20) if rid in bm
    }
    return tables, bm.refcounts().tolist(), bm.free_blocks().tolist()


def expected_slots(bm: BlockManager, request_id: int, start: int, end: int) -> list[int]:
    table = bm.block_table(request_id)
    bs = bm.block_size
    return [int(table[p // bs]) * bs + p % bs for p in range(start, end)]


# ---- construction ------------------------------------------------------------------------


def test_defaults_and_fresh_pool():
    bm = BlockManager(200)
    assert (bm.num_blocks, bm.block_size, bm.watermark, bm.watermark_blocks) == (200, 16, 0.01, 2)
    assert bm.stats() == BlockManagerStats(200, 200, 0, 0.0, 0)
    assert bm.refcounts().tolist() == [0] * 200
    # The stack's top (last) is block 0: a fresh pool hands out 0, 1, 2, ...
    assert bm.free_blocks().tolist() == list(range(199, -1, -1))
    bm.check_invariants()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_blocks": 0}, "num_blocks must be >= 1, got 0"),
        ({"num_blocks": -3}, "num_blocks must be >= 1, got -3"),
        ({"num_blocks": 2**31 // 8}, "num_blocks must be <= 268435455 for block_size 8"),
        ({"num_blocks": 4.0}, "num_blocks must be an int, got 4.0"),
        ({"num_blocks": True}, "num_blocks must be an int, got True"),
        ({"block_size": 12}, r"block_size must be one of \(8, 16, 32\), got 12"),
        ({"block_size": 16.0}, "block_size must be an int, got 16.0"),
        ({"watermark": -0.1}, r"watermark must be in \[0, 1\), got -0.1"),
        ({"watermark": 1.0}, r"watermark must be in \[0, 1\), got 1"),
        ({"watermark": float("nan")}, r"watermark must be in \[0, 1\), got nan"),
        ({"watermark": "0.1"}, "watermark must be a float in \\[0, 1\\), got '0.1'"),
    ],
)
def test_constructor_rejects(kwargs, match):
    args = {"num_blocks": 10, "block_size": 8, "watermark": 0.0} | kwargs
    with pytest.raises(ValueError, match=match):
        BlockManager(**args)


def test_largest_pool_is_accepted():
    bm = BlockManager(2**31 // 32 - 1, block_size=32, watermark=0.0)
    assert bm.can_allocate(100) is AllocStatus.OK


def test_alloc_status_matches_native_enum():
    for member in AllocStatus:
        assert int(_C.AllocStatus.__members__[member.name]) == member.value
    assert len(_C.AllocStatus.__members__) == len(AllocStatus)


# ---- admission ---------------------------------------------------------------------------


def test_can_allocate_ok_later_never_with_watermark():
    bm = BlockManager(100, block_size=16, watermark=0.1)  # 10 watermark blocks
    assert bm.watermark_blocks == 10
    assert bm.can_allocate(0) is AllocStatus.OK
    assert bm.can_allocate(90 * 16) is AllocStatus.OK  # leaves exactly the watermark
    assert bm.can_allocate(90 * 16 + 1) is AllocStatus.NEVER  # 91 > 100 - 10
    assert bm.can_allocate(10**18) is AllocStatus.NEVER
    bm.allocate(1, 50 * 16)
    assert bm.can_allocate(40 * 16) is AllocStatus.OK
    assert bm.can_allocate(40 * 16 + 1) is AllocStatus.LATER
    assert bm.can_allocate(90 * 16) is AllocStatus.LATER
    bm.free(1)
    assert bm.can_allocate(90 * 16) is AllocStatus.OK


def test_can_allocate_rejects_negative():
    with pytest.raises(ValueError, match="can_allocate: num_tokens must be >= 0, got -1"):
        BlockManager(10).can_allocate(-1)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(
    "tokens_fn",
    [
        lambda bs: 0,
        lambda bs: 1,
        lambda bs: bs - 1,
        lambda bs: bs,
        lambda bs: bs + 1,
        lambda bs: 3 * bs + 5,
    ],
)
def test_allocate_builds_block_table_and_slots(block_size, tokens_fn):
    num_tokens = tokens_fn(block_size)
    bm = BlockManager(16, block_size=block_size, watermark=0.0)
    bm.allocate(7, num_tokens)
    num_blocks = math.ceil(num_tokens / block_size)
    table = bm.block_table(7)
    assert table.dtype == np.int32 and table.tolist() == list(range(num_blocks))
    assert bm.num_tokens(7) == num_tokens
    assert bm.slot_mapping(7).tolist() == list(range(num_tokens))  # blocks 0.. in order
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.num_requests) == (
        num_blocks,
        16 - num_blocks,
        1,
    )
    assert bm.refcounts().tolist() == [1] * num_blocks + [0] * (16 - num_blocks)
    bm.check_invariants()


def test_allocate_errors_change_nothing():
    bm = BlockManager(10, block_size=8, watermark=0.1)  # 1 watermark block
    bm.allocate(1, 20)
    before = snapshot(bm)
    with pytest.raises(ValueError, match="allocate: request_id 1 is already allocated"):
        bm.allocate(1, 8)
    with pytest.raises(ValueError, match="allocate: num_tokens must be >= 0, got -2"):
        bm.allocate(2, -2)
    with pytest.raises(
        ValueError,
        match=r"request_id 2 needs 7 blocks .* can_allocate is LATER "
        r"\(7 free, watermark 1 of 10 blocks\)",
    ):
        bm.allocate(2, 7 * 8)
    with pytest.raises(
        ValueError, match="needs 10 blocks for num_tokens 80 but can_allocate is NEVER"
    ):
        bm.allocate(2, 80)
    assert snapshot(bm) == before
    assert 2 not in bm
    bm.check_invariants()


def test_request_ids_span_int64():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    for rid in (-(2**63), -1, 0, 2**63 - 1):
        bm.allocate(rid, 3)
        assert rid in bm
    assert bm.seq_lens([-(2**63), 2**63 - 1]).tolist() == [3, 3]
    with pytest.raises(TypeError):
        bm.allocate(2**63, 3)
    assert "x" not in bm and 5 not in bm and 2**64 not in bm and 1.0 not in bm
    assert np.int64(-1) in bm


# ---- append ------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_append_slots_continues_positions(block_size):
    bm = BlockManager(8, block_size=block_size, watermark=0.0)
    bm.allocate(3, block_size - 1)
    result = bm.append_slots(3)  # fills the last block
    assert isinstance(result, AppendResult)
    assert result.slot_mapping.dtype == np.int64 and result.slot_mapping.tolist() == [
        block_size - 1
    ]
    assert result.block_copies.shape == (0, 2) and result.block_copies.dtype == np.int64
    assert bm.block_table(3).tolist() == [0]
    result = bm.append_slots(3)  # next position opens block 1
    assert result.slot_mapping.tolist() == [block_size]
    assert bm.block_table(3).tolist() == [0, 1]
    result = bm.append_slots(3, 2 * block_size + 3)  # spans blocks 1..3
    assert result.slot_mapping.tolist() == expected_slots(bm, 3, block_size + 1, 3 * block_size + 4)
    assert bm.num_tokens(3) == 3 * block_size + 4
    assert bm.block_table(3).tolist() == [0, 1, 2, 3]
    bm.check_invariants()


def test_append_slots_out_of_blocks_returns_none_and_changes_nothing():
    bm = BlockManager(3, block_size=8, watermark=0.0)
    bm.allocate(1, 16)
    bm.allocate(2, 8)
    before = snapshot(bm)
    assert bm.can_append_slots(1) is False
    assert bm.append_slots(1) is None
    assert bm.append_slots(2, 100) is None
    assert snapshot(bm) == before
    bm.free(2)
    assert bm.can_append_slots(1, 8) is True
    assert bm.can_append_slots(1, 9) is False
    assert bm.append_slots(1, 8).slot_mapping.tolist() == list(range(16, 24))
    bm.check_invariants()


def test_can_append_slots_uses_the_watermark():
    bm = BlockManager(10, block_size=8, watermark=0.5)  # admission keeps 5 blocks free
    bm.allocate(1, 5 * 8)
    assert bm.can_allocate(1) is AllocStatus.LATER
    assert bm.can_append_slots(1, 5 * 8) is True
    assert bm.append_slots(1, 5 * 8) is not None
    assert bm.num_free_blocks == 0


@pytest.mark.parametrize("method", ["append_slots", "can_append_slots"])
def test_append_errors(method):
    bm = BlockManager(4, block_size=8, watermark=0.0)
    bm.allocate(1, 4)
    before = snapshot(bm)
    call = getattr(bm, method)
    with pytest.raises(ValueError, match=f"{method}: request_id 9 is not allocated"):
        call(9)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"{method}: num_new_tokens must be >= 1, got {bad}"):
            call(1, bad)
    with pytest.raises(TypeError):
        call(1, 1.5)
    assert snapshot(bm) == before


# ---- fork and copy-on-write --------------------------------------------------------------


def test_fork_shares_blocks():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(1, 20)  # blocks 0, 1, 2
    bm.fork(1, 2)
    assert bm.block_table(2).tolist() == [0, 1, 2] and bm.num_tokens(2) == 20
    assert bm.refcounts()[:4].tolist() == [2, 2, 2, 0]
    assert bm.num_used_blocks == 3 and bm.num_requests == 2
    bm.free(1)  # the child still owns every block
    assert bm.refcounts()[:3].tolist() == [1, 1, 1] and bm.num_used_blocks == 3
    bm.free(2)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_errors():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(1, 5)
    bm.allocate(2, 5)
    before = snapshot(bm)
    with pytest.raises(ValueError, match="fork: request_id 3 is not allocated"):
        bm.fork(3, 4)
    with pytest.raises(ValueError, match="fork: request_id 2 is already allocated"):
        bm.fork(1, 2)
    with pytest.raises(ValueError, match="fork: request_id 1 is already allocated"):
        bm.fork(1, 1)
    assert snapshot(bm) == before


def test_append_to_shared_partial_block_copies_on_write():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(1, 12)  # blocks 0, 1; block 1 holds positions 8..11
    bm.fork(1, 2)
    result = bm.append_slots(2)
    assert result.block_copies.tolist() == [[1, 2]]  # copy block 1 into fresh block 2
    assert bm.block_table(2).tolist() == [0, 2] and bm.block_table(1).tolist() == [0, 1]
    assert result.slot_mapping.tolist() == [2 * 8 + 4]
    assert bm.refcounts()[:3].tolist() == [2, 1, 1]
    result = bm.append_slots(1)  # block 1 is the parent's alone now: no copy
    assert result.block_copies.shape == (0, 2)
    assert result.slot_mapping.tolist() == [1 * 8 + 4]
    bm.check_invariants()


def test_append_at_block_boundary_needs_no_copy():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(1, 16)
    bm.fork(1, 2)
    result = bm.append_slots(2)
    assert result.block_copies.shape == (0, 2)
    assert bm.block_table(2).tolist() == [0, 1, 2]
    assert bm.refcounts()[:3].tolist() == [2, 2, 1]
    bm.check_invariants()


def test_copy_on_write_out_of_blocks_changes_nothing():
    bm = BlockManager(2, block_size=8, watermark=0.0)
    bm.allocate(1, 12)
    bm.fork(1, 2)
    assert bm.num_free_blocks == 0
    before = snapshot(bm)
    assert bm.can_append_slots(2) is False
    assert bm.append_slots(2) is None
    assert snapshot(bm) == before
    bm.check_invariants()


def test_batch_of_sharers_copies_exactly_what_it_must():
    # Three requests share a partial last block: the first two copy it, the third finds
    # itself the only owner left and writes in place. Planning must count 2, not 3.
    bm = BlockManager(4, block_size=8, watermark=0.0)
    bm.allocate(1, 4)  # block 0
    bm.fork(1, 2)
    bm.fork(1, 3)
    bm.allocate(4, 8)  # block 1: leaves exactly 2 free blocks
    assert bm.num_blocks_to_append([1, 2, 3]) == 2
    assert bm.num_blocks_to_append([2]) == 1
    result = bm.append_slots_batch([1, 2, 3])
    assert result is not None
    assert result.block_copies.tolist() == [[0, 2], [0, 3]]
    assert [bm.block_table(r).tolist() for r in (1, 2, 3)] == [[2], [3], [0]]
    assert result.slot_mapping.tolist() == [2 * 8 + 4, 3 * 8 + 4, 0 * 8 + 4]
    assert bm.refcounts().tolist() == [1, 1, 1, 1]
    bm.check_invariants()


# ---- batch calls -------------------------------------------------------------------------


def make_running(num_requests: int, block_size: int = 8) -> BlockManager:
    bm = BlockManager(64, block_size=block_size, watermark=0.0)
    for rid in range(num_requests):
        bm.allocate(rid, 3 + 5 * rid)
    return bm


def test_append_slots_batch_matches_single_appends():
    batched, single = make_running(5), make_running(5)
    ids = [4, 0, 2, 1, 3]
    counts = [1, 9, 3, 17, 1]
    result = batched.append_slots_batch(ids, counts)
    slots = [single.append_slots(rid, n).slot_mapping for rid, n in zip(ids, counts, strict=True)]
    assert result.slot_mapping.tolist() == np.concatenate(slots).tolist()
    assert snapshot(batched) == snapshot(single)
    decode = batched.append_slots_batch(np.array(ids, dtype=np.int32))  # one token each
    assert decode.slot_mapping.tolist() == [
        expected_slots(batched, rid, batched.num_tokens(rid) - 1, batched.num_tokens(rid))[0]
        for rid in ids
    ]
    batched.check_invariants()


def test_append_slots_batch_accepts_tensors_and_empty():
    bm = make_running(3)
    result = bm.append_slots_batch(torch.tensor([0, 1, 2]), torch.tensor([2, 2, 2]))
    assert result.slot_mapping.shape == (6,)
    torch.from_numpy(result.slot_mapping)  # zero-copy into what write_kv takes
    empty = bm.append_slots_batch([])
    assert empty.slot_mapping.shape == (0,) and empty.block_copies.shape == (0, 2)


def test_append_slots_batch_is_all_or_nothing():
    bm = BlockManager(4, block_size=8, watermark=0.0)
    bm.allocate(1, 8)
    bm.allocate(2, 8)
    bm.allocate(3, 8)
    before = snapshot(bm)
    assert bm.num_blocks_to_append([1, 2]) == 2
    assert bm.append_slots_batch([1, 2]) is None  # 1 would fit alone
    assert bm.append_slots_batch([3], [9]) is None
    assert snapshot(bm) == before
    bm.free(3)
    result = bm.append_slots_batch([1, 2])
    assert result.slot_mapping.tolist() == [2 * 8, 3 * 8]  # freed block 2 first (LIFO)
    bm.check_invariants()


@pytest.mark.parametrize(
    ("ids", "counts", "match"),
    [
        ([0, 7], None, r": request_ids\[1\] = 7 is not allocated"),
        ([1, 0, 1], None, r"request_ids\[2\] = 1 appears more than once in request_ids"),
        ([0, 1], [1, 0], r"num_new_tokens\[1\] must be >= 1, got 0"),
        ([0, 1], [1, -4], r"num_new_tokens\[1\] must be >= 1, got -4"),
        ([0, 1], [1], r"num_new_tokens must have one count per request \(2\), got 1"),
        ([0, 1.5], None, "request_ids must hold ints, got dtype float64"),
        (np.array([0.0]), None, "request_ids must hold ints, got dtype float64"),
        ([True], None, "request_ids must hold ints, got dtype bool"),
        ([[0, 1]], None, "request_ids must be 1-D, got 2 dimensions"),
        (3, None, "request_ids must be 1-D, got 0 dimensions"),
        (
            [[0], [0, 1]],
            None,
            r"request_ids must be a 1-D sequence of ints, got \[\[0\], \[0, 1\]\]",
        ),
        (np.array([1], dtype=np.uint64), None, "request_ids must fit int64, got dtype uint64"),
        ([0], [2.0], "num_new_tokens must hold ints, got dtype float64"),
    ],
)
@pytest.mark.parametrize("method", ["append_slots_batch", "num_blocks_to_append"])
def test_batch_errors_change_nothing(method, ids, counts, match):
    bm = make_running(3)
    before = snapshot(bm)
    with pytest.raises(ValueError, match=match):
        getattr(bm, method)(ids, counts)
    assert snapshot(bm) == before
    bm.check_invariants()


def test_num_blocks_to_append_predicts_append():
    bm = make_running(6)
    bm.fork(3, 10)
    for ids, counts in (([0, 1, 2], None), ([3, 10, 5], [1, 30, 2]), ([10], [8])):
        before = snapshot(bm)
        predicted = bm.num_blocks_to_append(ids, counts)
        assert snapshot(bm) == before  # predicting changed nothing
        free_before = bm.num_free_blocks
        assert bm.append_slots_batch(ids, counts) is not None
        assert free_before - bm.num_free_blocks == predicted
    bm.check_invariants()


# ---- free --------------------------------------------------------------------------------


def test_free_returns_blocks_lifo():
    bm = BlockManager(10, block_size=8, watermark=0.0)
    bm.allocate(1, 24)  # 0, 1, 2
    bm.allocate(2, 16)  # 3, 4
    bm.free(1)
    assert bm.free_blocks().tolist()[-3:] == [2, 1, 0]
    bm.allocate(3, 17)  # reuses the freed blocks first, in their old order
    assert bm.block_table(3).tolist() == [0, 1, 2]
    assert bm.stats() == BlockManagerStats(10, 5, 5, 0.5, 2)
    bm.check_invariants()


def test_free_errors():
    bm = BlockManager(4, block_size=8, watermark=0.0)
    bm.allocate(1, 4)
    bm.free(1)
    with pytest.raises(ValueError, match="free: request_id 1 is not allocated"):
        bm.free(1)
    with pytest.raises(ValueError, match="free: request_id 5 is not allocated"):
        bm.free(5)
    assert bm.num_free_blocks == 4


# ---- kernel inputs -----------------------------------------------------------------------


def test_block_tables_and_seq_lens():
    bm = make_running(3)  # 3, 8, 13 tokens: 1, 1, 2 blocks
    tables = bm.block_tables([2, 0, 1])
    assert tables.dtype == np.int32 and tables.tolist() == [[2, 3], [0, 0], [1, 0]]
    wide = bm.block_tables([2, 0], max_blocks_per_seq=5)
    assert wide.shape == (2, 5) and wide[1, 1:].tolist() == [0, 0, 0, 0]
    assert bm.block_tables([]).shape == (0, 0)
    lens = bm.seq_lens([1, 2, 0])
    assert lens.dtype == np.int32 and lens.tolist() == [8, 13, 3]


def test_block_tables_and_seq_lens_errors():
    bm = make_running(3)
    with pytest.raises(
        ValueError,
        match=r"max_blocks_per_seq must be >= 2 \(the widest "
        r"block_table of the batch\), got 1",
    ):
        bm.block_tables([0, 2], max_blocks_per_seq=1)
    with pytest.raises(ValueError, match=r"block_tables: request_ids\[1\] = 9 is not allocated"):
        bm.block_tables([0, 9])
    with pytest.raises(ValueError, match=r"seq_lens: request_ids\[0\] = 9 is not allocated"):
        bm.seq_lens([9])
    with pytest.raises(ValueError, match="request_ids must hold ints"):
        bm.seq_lens([0.5])


def test_slot_mapping_ranges():
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(1, 4)
    bm.allocate(2, 20)  # blocks 1, 2, 3
    assert bm.slot_mapping(2, 6, 10).tolist() == [14, 15, 16, 17]
    assert bm.slot_mapping(2, 18).tolist() == [26, 27]
    assert bm.slot_mapping(2, 20, 20).shape == (0,)
    assert bm.slot_mapping(2).tolist() == expected_slots(bm, 2, 0, 20)


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (5, 4), (0, 21), (21, None)])
def test_slot_mapping_rejects_bad_ranges(start, end):
    bm = BlockManager(8, block_size=8, watermark=0.0)
    bm.allocate(2, 20)
    with pytest.raises(
        ValueError,
        match=r"slot_mapping: positions \[.*must lie in \[0, "
        r"num_tokens = 20\] of request_id 2",
    ):
        bm.slot_mapping(2, start, end)


@pytest.mark.parametrize("method", ["block_table", "num_tokens", "slot_mapping"])
def test_per_request_queries_reject_unknown_ids(method):
    bm = BlockManager(8)
    with pytest.raises(ValueError, match=f"{method}: request_id 4 is not allocated"):
        getattr(bm, method)(4)


def test_stats_usage_and_repr():
    bm = BlockManager(40, block_size=8, watermark=0.0)
    bm.allocate(1, 80)
    bm.fork(1, 2)
    assert bm.stats() == BlockManagerStats(40, 30, 10, 0.25, 2)
    assert bm.usage == 0.25 and bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
    assert "num_free_blocks=30" in repr(bm)


def test_counts_beyond_the_pool_are_exact_and_never_overflow():
    bm = BlockManager(1, block_size=8, watermark=0.0)
    bm.allocate(1, 1)
    assert bm.num_blocks_to_append([1], [9]) == 1  # exact, although more than the pool
    assert bm.num_blocks_to_append([1], [17]) == 2
    huge = 2**63 - 1
    assert bm.num_blocks_to_append([1], [huge]) == 2**60 - 2  # count bounded to huge - 8
    for child in range(2, 12):
        bm.fork(1, child)
    ids = list(range(1, 12))
    assert bm.num_blocks_to_append(ids, [huge] * len(ids)) == huge  # the sum saturates
    assert bm.can_append_slots(1, huge) is False
    assert bm.append_slots(1, huge) is None
    assert bm.append_slots_batch(ids, [huge] * len(ids)) is None
    bm.check_invariants()

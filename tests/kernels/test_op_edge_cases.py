"""Edges every op must take: empty batches, size-1 views with odd strides, numpy ids straight
from the block manager, and the thread count seen from any Python thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from distserve_rt import _native, ops
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view


def _pool(num_blocks=8, block_size=16, num_kv_heads=2, head_dim=64, num_layers=2):
    spec = KVCacheSpec(num_blocks, num_layers, num_kv_heads, head_dim, block_size)
    return allocate_kv_pool(spec).normal_(generator=torch.Generator().manual_seed(0))


def test_prefill_with_no_new_tokens_is_a_no_op():
    q = torch.empty(0, 4, 64)
    kv = torch.empty(0, 2, 64)
    out = ops.prefill_attention(q, kv, kv, torch.zeros(3, dtype=torch.int32))
    assert out.shape == (0, 4, 64)


def test_write_kv_all_padding_into_an_empty_pool():
    kv_cache = torch.empty(0, 2, 2, 16, 64)
    key = torch.randn(3, 2, 64)
    ops.write_kv(key, key, kv_cache, torch.full((3,), -1, dtype=torch.int64))


def test_single_row_views_with_any_dim0_stride():
    """A [1, H, D] view may report any stride for dim 0 (torch does after a transpose)."""
    gen = torch.Generator().manual_seed(1)
    pool = _pool()
    kv_cache = layer_view(pool, 1)
    query = torch.randn(4, 1, 64, generator=gen).transpose(0, 1)  # [1, 4, 64], stride(0) 64
    block_table = torch.tensor([[3, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([20], dtype=torch.int32)
    out = ops.decode_attention(query, kv_cache, block_table, seq_lens)
    ref = ops.decode_attention(query.contiguous(), kv_cache, block_table, seq_lens)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    q = torch.randn(4, 1, 64, generator=gen).transpose(0, 1)  # one token
    k = torch.randn(2, 1, 64, generator=gen).transpose(0, 1)
    out = ops.prefill_attention(q, k, k, torch.tensor([0, 1], dtype=torch.int32))
    expected = ops.prefill_attention(
        q.contiguous(), k.contiguous(), k.contiguous(), torch.tensor([0, 1], dtype=torch.int32)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_block_manager_output_drives_the_ops():
    """AppendResult's numpy slot_mapping and block_copies go to the ops as they are."""
    gen = torch.Generator().manual_seed(2)
    pool = _pool(num_blocks=8, block_size=8)
    manager = BlockManager(num_blocks=8, block_size=8, watermark=0.0)
    manager.allocate(0, 5)  # a partly filled block
    manager.fork(0, 1)  # shares it; the next append copies on write
    result = manager.append_slots(1)
    assert result is not None and result.block_copies.shape == (1, 2)
    src, dst = (int(x) for x in result.block_copies[0])
    before = pool[src].clone()
    ops.copy_blocks(pool, pool, result.block_copies)
    assert torch.equal(pool[dst], before)

    key = torch.randn(1, 2, 64, generator=gen)
    ops.write_kv(key, key, layer_view(pool, 0), result.slot_mapping)
    slot = int(result.slot_mapping[0])
    assert torch.equal(pool[slot // 8, 0, 0, :, slot % 8], key[0])

    empty = manager.append_slots(0)  # no copy needed: an empty (0, 2) array is a no-op
    assert empty is not None and empty.block_copies.shape == (0, 2)
    ops.copy_blocks(pool, pool, empty.block_copies)


def test_copy_blocks_rejects_float_numpy_mapping():
    pool = _pool()
    with pytest.raises(ValueError, match="block_mapping has dtype"):
        ops.copy_blocks(pool, pool, np.array([[0.0, 1.0]]))


def test_thread_count_holds_on_every_python_thread():
    before = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(_native.get_num_threads()))
        worker.start()
        worker.join()
        assert seen == [1] and _native.get_num_threads() == 1
    finally:
        _native.set_num_threads(before)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        _native.set_num_threads(0)

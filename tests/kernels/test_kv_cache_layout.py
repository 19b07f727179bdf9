"""The KV pool layout of distserve_rt.core.kv_cache: spec validation, shapes, sizes and the
per-layer view the kernels take (dim 0 keeps the pool's block stride)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distserve_rt.core.kv_cache import (
    ALLOWED_BLOCK_SIZES,
    KVCacheSpec,
    allocate_kv_pool,
    layer_view,
)

VALID = {"num_blocks": 5, "num_layers": 3, "num_kv_heads": 2, "head_dim": 64}


@pytest.mark.parametrize("field", ["num_blocks", "num_layers", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("bad", [0, -3, 2.0, "4", None, True])
def test_spec_rejects_non_positive_int_sizes(field, bad):
    with pytest.raises(ValueError, match=rf"{field} must be a positive int, got {bad!r}"):
        KVCacheSpec(**{**VALID, field: bad})


@pytest.mark.parametrize("block_size", [0, 1, 4, 12, 64, None, 16.0])
def test_spec_rejects_block_sizes_the_kernels_do_not_take(block_size):
    with pytest.raises(ValueError, match=r"block_size must be one of \(8, 16, 32\)"):
        KVCacheSpec(**VALID, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.int64, "float32"])
def test_spec_rejects_dtypes_the_kernels_do_not_take(dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        KVCacheSpec(**VALID, dtype=dtype)


def test_spec_is_frozen():
    spec = KVCacheSpec(**VALID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_blocks = 7


@pytest.mark.parametrize("block_size", ALLOWED_BLOCK_SIZES)
@pytest.mark.parametrize(
    ("dtype", "element_size"), [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)]
)
def test_spec_shape_and_sizes(block_size, dtype, element_size):
    spec = KVCacheSpec(**VALID, block_size=block_size, dtype=dtype)
    assert spec.shape == (5, 3, 2, 2, block_size, 64)
    assert spec.block_numel == 3 * 2 * 2 * block_size * 64
    assert spec.block_bytes == spec.block_numel * element_size
    assert spec.num_slots == 5 * block_size


def test_spec_defaults():
    spec = KVCacheSpec(**VALID)
    assert spec.block_size == 16 and spec.dtype == torch.float32


def test_allocate_kv_pool_matches_spec():
    spec = KVCacheSpec(**VALID, block_size=8, dtype=torch.bfloat16)
    pool = allocate_kv_pool(spec)
    assert pool.shape == spec.shape and pool.dtype == torch.bfloat16
    assert pool.is_contiguous() and pool.device.type == "cpu"
    assert not pool.any(), "a fresh pool is zero-filled"
    assert pool.numel() * pool.element_size() == spec.num_blocks * spec.block_bytes


def test_one_block_is_one_contiguous_span_across_layers():
    """What copy_blocks relies on: block b = bytes [b * block_bytes, (b + 1) * block_bytes)."""
    spec = KVCacheSpec(**VALID, block_size=8)
    pool = allocate_kv_pool(spec)
    assert pool.stride(0) == spec.block_numel
    assert all(pool[b].is_contiguous() for b in range(spec.num_blocks))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_view_shape_strides_and_aliasing(layer):
    spec = KVCacheSpec(**VALID, block_size=16)
    pool = torch.randn(spec.shape)
    kv_cache = layer_view(pool, layer)
    assert kv_cache.shape == (5, 2, 2, 16, 64)  # [num_blocks, 2, num_kv_heads, block_size, hd]
    # dim 0 keeps the pool's block stride; dims 1.. are dense (HND inside a block)
    assert kv_cache.stride() == (spec.block_numel, 2 * 16 * 64, 16 * 64, 64, 1)
    layer_numel = 2 * 2 * 16 * 64
    assert kv_cache.data_ptr() == pool.data_ptr() + layer * layer_numel * pool.element_size()
    kv_cache[4, 1, 0, 15, 63] = 123.0  # a view: writes land in the pool
    assert pool[4, layer, 1, 0, 15, 63] == 123.0


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_layer_view_rejects_layers_out_of_range(layer):
    pool = allocate_kv_pool(KVCacheSpec(**VALID))
    with pytest.raises(ValueError, match=rf"layer must be in \[0, 3\), got {layer}"):
        layer_view(pool, layer)


@pytest.mark.parametrize(
    "shape",
    [
        (5, 3, 2, 2, 16),  # 5-D: a layer view, not a pool
        (5, 3, 2, 2, 16, 64, 1),  # 7-D
        (5, 3, 1, 2, 16, 64),  # dim 2 must hold K and V
        (5, 3, 3, 2, 16, 64),
    ],
)
def test_layer_view_rejects_non_pool_shapes(shape):
    with pytest.raises(ValueError, match=r"pool must have shape \[num_blocks, num_layers, 2"):
        layer_view(torch.zeros(shape), 0)

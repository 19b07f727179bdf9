"""Descriptors, slices and id checks shared by every backend."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.transfer import KVSlice, PoolDescriptor, PoolGeometry
from distserve_rt.transfer.descriptor import block_mapping, describe_pool


def _desc(**overrides) -> PoolDescriptor:
    pool = torch.zeros(4, 3, 2, 4, 8, 16, dtype=torch.bfloat16)
    desc = describe_pool(pool, transport="shm", handle="x", offset_bytes=0, region_bytes=1 << 20)
    fields = {f: getattr(desc, f) for f in PoolDescriptor.__slots__}
    return PoolDescriptor(**{**fields, **overrides})


def test_descriptor_round_trip_is_small():
    desc = _desc()
    data = desc.to_bytes()
    assert PoolDescriptor.from_bytes(data) == desc
    assert len(data) < 400
    assert desc.head_bytes == 8 * 16 * 2
    assert desc.block_stride_bytes == 3 * 2 * 4 * 8 * 16 * 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"dtype": "int8"}, "dtype"),
        ({"offset_bytes": -1}, "offset"),
    ],
)
def test_descriptor_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _desc(**overrides)


def test_slice_defaults_cover_the_source():
    dst = PoolGeometry(4, 3, 4, 8, 16, torch.bfloat16, 3 * 2 * 4 * 8 * 16 * 2)
    assert KVSlice().resolve(_desc(), dst) == (0, 0, 3, 0, 0, 4)
    assert KVSlice(src_head_start=2).resolve(_desc(), dst) == (0, 0, 3, 2, 0, 2)


@pytest.mark.parametrize(
    ("kv_slice", "match"),
    [
        (KVSlice(src_layer_start=2, num_layers=2), r"source layers \[2, 4\)"),
        (KVSlice(dst_layer_start=1), r"destination layers \[1, 4\)"),
        (KVSlice(src_head_start=3, num_heads=2), r"source KV heads \[3, 5\)"),
    ],
)
def test_slice_out_of_range(kv_slice, match):
    dst = PoolGeometry(4, 3, 4, 8, 16, torch.bfloat16, 3 * 2 * 4 * 8 * 16 * 2)
    with pytest.raises(ValueError, match=match):
        kv_slice.resolve(_desc(), dst)


@pytest.mark.parametrize("bad", [{"num_heads": 0}, {"src_layer_start": -1}, {"num_layers": True}])
def test_slice_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KVSlice(**bad)


def test_block_mapping_checks():
    assert block_mapping([1, 2], [0, 3], 4, 4).tolist() == [[1, 0], [2, 3]]
    assert block_mapping([], [], 4, 4).shape == (0, 2)
    with pytest.raises(ValueError, match="pair up one to one"):
        block_mapping([1], [0, 3], 4, 4)
    with pytest.raises(ValueError, match="integer block ids"):
        block_mapping([1.0], [0], 4, 4)
    with pytest.raises(ValueError, match=r"src block id 4 \(pair 1\) .* source pool has 4"):
        block_mapping([0, 4], [0, 1], 4, 8)
    with pytest.raises(ValueError, match="pairs 0 and 2 both write dst block 5"):
        block_mapping([0, 1, 2], [5, 1, 5], 4, 8)
    # Native transports leave the checks to their engines (tests/transfer/test_shm_*).
    assert block_mapping([0, 4], [5, 5], 4, 8, check_ids=False).tolist() == [[0, 5], [4, 5]]


def test_pool_geometry_rejects_non_contiguous_blocks():
    pool = torch.zeros(4, 3, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        PoolGeometry.of(pool[:, :, :, :2])

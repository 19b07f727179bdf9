"""The native block-slice copy (include/distserve_rt/transfer/block_slice.h) against the
plain-torch reference, in one process (the shm engine may open its own region): a grid of
dtypes, slices and copy-thread counts, including runs longer than the 4 MiB parallel
chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import KVSlice, PoolGeometry, TransferStatus, create_transport
from distserve_rt.transfer.fake import reference_transfer
from tests.transfer.peer_process import bits

SRC = KVCacheSpec(num_blocks=6, num_layers=3, num_kv_heads=4, head_dim=8, block_size=8)
SLICES = [
    KVSlice(),
    KVSlice(src_head_start=1, num_heads=2, dst_head_start=0),
    KVSlice(src_layer_start=1, num_layers=2, dst_layer_start=1),
    KVSlice(src_layer_start=2, num_layers=1, src_head_start=3, num_heads=1, dst_head_start=2),
]


@pytest.mark.parametrize("num_copy_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_slice", SLICES, ids=range(len(SLICES)))
def test_matches_reference(num_copy_threads, dtype, kv_slice):
    with create_transport("shm", num_copy_threads=num_copy_threads) as transport:
        src = transport.allocate_pool(KVCacheSpec(**{**_fields(SRC), "dtype": dtype}))
        src.copy_(torch.randn(src.shape).to(dtype))
        peer = transport.open_peer(transport.register_pool(src))
        dst = torch.randn(5, 3, 2, 4, 8, 8).to(dtype)
        expected = dst.clone()
        mapping = np.array([[5, 0], [0, 3], [2, 4]])
        handle = transport.submit(peer, dst, mapping[:, 0], mapping[:, 1], kv_slice)
        assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
        slice_args = kv_slice.resolve(peer.descriptor, PoolGeometry.of(dst))
        reference_transfer(src, expected, mapping, slice_args)
        assert torch.equal(bits(dst), bits(expected))


def test_runs_longer_than_a_parallel_chunk():
    # One block = 10 layers x 2 x 8 heads x 32 x 128 fp32 = 6.5 MiB > the 4 MiB chunk.
    spec = KVCacheSpec(num_blocks=2, num_layers=10, num_kv_heads=8, head_dim=128, block_size=32)
    with create_transport("shm", num_copy_threads=2) as transport:
        src = transport.allocate_pool(spec)
        src.view(torch.int32).random_()
        peer = transport.open_peer(transport.register_pool(src))
        dst = torch.zeros(spec.shape)
        handle = transport.submit(peer, dst, [1, 0], [0, 1])
        assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
        assert torch.equal(bits(dst), bits(src[[1, 0]]))
        assert transport.stats().bytes_succeeded == 2 * spec.block_bytes


def test_empty_transfer_succeeds_with_zero_bytes():
    with create_transport("shm") as transport:
        peer = transport.open_peer(transport.register_pool(transport.allocate_pool(SRC)))
        handle = transport.submit(peer, torch.zeros(SRC.shape), [], [])
        assert handle.wait(10.0) == TransferStatus.SUCCESS
        assert handle.result.num_bytes == 0


def _fields(spec: KVCacheSpec) -> dict:
    return {name: getattr(spec, name) for name in KVCacheSpec.__slots__}

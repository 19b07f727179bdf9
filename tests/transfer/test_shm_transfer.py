"""Host transports (shm, nixl) between two real processes: random KV moves bit-exactly,
whole blocks and re-sliced (decode TP > prefill TP by heads, a different PP split by layers).
nixl runs with UCX_TLS=tcp: the network path, not UCX's same-host shortcut (cma)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import (
    KVSlice,
    PoolDescriptor,
    PoolGeometry,
    TransferStatus,
    create_transport,
)
from distserve_rt.transfer.fake import reference_transfer
from tests.transfer.peer_process import PeerProcess, bits, random_pool, ucx_over_tcp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The prefill instance: TP 1, PP 1, 4 layers, 4 KV heads.
SRC = dict(num_blocks=12, num_layers=4, num_kv_heads=4, head_dim=16, block_size=8)


@pytest.fixture(scope="module", params=["shm", "nixl"])
def transport_name(request):
    if request.param == "nixl":
        with ucx_over_tcp():
            yield "nixl"
    else:
        yield request.param


@pytest.fixture(scope="module")
def peer(transport_name):
    """One producer process per transport, with a source pool per dtype."""
    process = PeerProcess(transport_name)
    descriptors = {}
    for seed, dtype in enumerate(DTYPES):
        spec = KVCacheSpec(**SRC, dtype=dtype)
        descriptors[dtype] = (PoolDescriptor.from_bytes(process.alloc(spec, seed)), spec, seed)
    yield descriptors
    process.exit()


@pytest.fixture(scope="module")
def transport(transport_name):
    with create_transport(transport_name) as t:
        yield t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_blocks_bit_exact(peer, transport, dtype):
    desc, spec, seed = peer[dtype]
    expected = random_pool(spec, seed)
    dst = torch.full(spec.shape[:0] + (6,) + spec.shape[1:], 7.0, dtype=dtype)
    src_ids, dst_ids = [3, 0, 11, 7], [5, 1, 0, 2]
    bytes_before = transport.stats().bytes_succeeded
    handle = transport.submit(transport.open_peer(desc), dst, src_ids, dst_ids)
    assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(bits(dst[d]), bits(expected[s]))
    assert torch.equal(bits(dst[[3, 4]]), bits(torch.full_like(dst[[3, 4]], 7.0)))  # untouched
    assert handle.result.num_bytes == 4 * spec.block_bytes
    assert transport.stats().bytes_succeeded - bytes_before == 4 * spec.block_bytes


def _pull(transport, desc, dst_spec, src_ids, kv_slice):
    dst = torch.zeros(dst_spec.shape, dtype=dst_spec.dtype)
    handle = transport.submit(
        transport.open_peer(desc), dst, src_ids, range(len(src_ids)), kv_slice
    )
    assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
    return dst, handle


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tp1_to_tp2_splits_heads(peer, transport, dtype):
    desc, spec, seed = peer[dtype]
    expected = random_pool(spec, seed)
    rank_spec = KVCacheSpec(**{**SRC, "num_blocks": 3, "num_kv_heads": 2}, dtype=dtype)
    src_ids = [9, 2, 4]
    for rank in range(2):
        kv_slice = KVSlice(src_head_start=2 * rank, num_heads=2)
        dst, handle = _pull(transport, desc, rank_spec, src_ids, kv_slice)
        heads = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(bits(dst), bits(expected[src_ids][:, :, :, heads]))
        assert handle.result.num_bytes == 3 * spec.block_bytes // 2


def test_pp1_to_pp2_splits_layers(peer, transport):
    desc, spec, seed = peer[torch.bfloat16]
    expected = random_pool(spec, seed)
    stage_spec = KVCacheSpec(**{**SRC, "num_blocks": 2, "num_layers": 2}, dtype=spec.dtype)
    for stage in range(2):
        kv_slice = KVSlice(src_layer_start=2 * stage, num_layers=2)
        dst, _ = _pull(transport, desc, stage_spec, [1, 10], kv_slice)
        assert torch.equal(bits(dst), bits(expected[[1, 10], 2 * stage : 2 * stage + 2]))


@pytest.mark.parametrize(
    "kv_slice",
    [
        KVSlice(src_layer_start=1, dst_layer_start=0, num_layers=2, src_head_start=3,
                dst_head_start=1, num_heads=1),
        KVSlice(src_layer_start=0, dst_layer_start=1, num_layers=3, src_head_start=1,
                dst_head_start=0, num_heads=3),
    ],
)  # fmt: skip
def test_layers_and_heads_match_torch_reference(peer, transport, kv_slice):
    desc, spec, seed = peer[torch.float16]
    source = random_pool(spec, seed)
    dst_spec = KVCacheSpec(**{**SRC, "num_blocks": 4, "num_kv_heads": 3}, dtype=spec.dtype)
    mapping = [[0, 3], [6, 1], [11, 0]]
    dst = torch.randn(dst_spec.shape).to(dst_spec.dtype)
    expected = dst.clone()
    src_ids, dst_ids = zip(*mapping, strict=True)
    handle = transport.submit(transport.open_peer(desc), dst, src_ids, dst_ids, kv_slice)
    assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
    slice_args = kv_slice.resolve(desc, PoolGeometry.of(dst))
    reference_transfer(source, expected, np.array(mapping), slice_args)
    assert torch.equal(bits(dst), bits(expected))


def test_open_peer_is_cached(peer, transport):
    desc, _, _ = peer[torch.float32]
    assert transport.open_peer(desc) is transport.open_peer(desc)

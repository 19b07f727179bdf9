"""cuda_ipc transport: its argument checks without a GPU (the CUDA module only), its clear
refusal without a device, and (`cuda`-marked) the shm tests' mirror between two real
processes on one GPU: bit-exact whole blocks and TP/PP re-slicing, both copy methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt import _native
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import (
    KVSlice,
    PeerUnavailableError,
    PoolDescriptor,
    TransferStatus,
    create_transport,
)
from tests.transfer.peer_process import PeerProcess, bits, random_pool

needs_cuda_module = pytest.mark.skipif(
    not _native.has_cuda_module(), reason="the distserve_rt._cuda module is not built"
)
SRC = dict(num_blocks=12, num_layers=4, num_kv_heads=4, head_dim=16, block_size=8)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_ipc_without_gpu_raises_not_falls_back():
    with pytest.raises(RuntimeError, match="needs a CUDA device.*shm transport"):
        create_transport("cuda_ipc")


@needs_cuda_module
def test_ipc_submit_argument_checks_without_gpu():
    check = _native.cuda_module().check_ipc_transfer_args
    pool = (12, 4, 4, 4 * 2 * 4 * 256)  # num_blocks, num_layers, num_kv_heads, stride bytes
    mapping = np.array([[0, 1], [11, 2]], dtype=np.int64)
    check(pool, pool, 256, (0, 0, 4, 0, 0, 4), mapping.ctypes.data, 2)  # valid: no error
    bad_ids = np.array([[12, 0]], dtype=np.int64)
    with pytest.raises(ValueError, match="src block id 12 .* source pool has 12 blocks"):
        check(pool, pool, 256, (0, 0, 4, 0, 0, 4), bad_ids.ctypes.data, 1)
    twice = np.array([[0, 3], [1, 3]], dtype=np.int64)
    with pytest.raises(ValueError, match="both write dst block 3"):
        check(pool, pool, 256, (0, 0, 4, 0, 0, 4), twice.ctypes.data, 2)
    with pytest.raises(ValueError, match=r"source heads \[2, 6\)"):
        check(pool, pool, 256, (0, 0, 4, 2, 0, 4), mapping.ctypes.data, 2)
    with pytest.raises(ValueError, match="block_stride_bytes"):
        check(pool, (12, 4, 4, 100), 256, (0, 0, 4, 0, 0, 4), mapping.ctypes.data, 2)


@pytest.fixture(scope="module")
def gpu_peer():
    process = PeerProcess("cuda_ipc")
    descriptors = {}
    for seed, dtype in enumerate(DTYPES):
        spec = KVCacheSpec(**SRC, dtype=dtype)
        descriptors[dtype] = (PoolDescriptor.from_bytes(process.alloc(spec, seed)), spec, seed)
    yield descriptors
    process.exit()


@pytest.fixture(params=["kernel", "memcpy_batch"])
def gpu_transport(request):
    with create_transport("cuda_ipc", device="cuda", method=request.param) as t:
        yield t


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_whole_blocks_bit_exact(gpu_peer, gpu_transport, dtype):
    desc, spec, seed = gpu_peer[dtype]
    expected = random_pool(spec, seed)
    dst = torch.full((6, *spec.shape[1:]), 7.0, dtype=dtype, device="cuda")
    src_ids, dst_ids = [3, 0, 11, 7], [5, 1, 0, 2]
    handle = gpu_transport.submit(gpu_transport.open_peer(desc), dst, src_ids, dst_ids)
    assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
    dst = dst.cpu()
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert torch.equal(bits(dst[d]), bits(expected[s]))
    assert torch.equal(dst[[3, 4]], torch.full_like(dst[[3, 4]], 7.0))
    assert gpu_transport.stats().bytes_succeeded == 4 * spec.block_bytes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tp1_to_tp2_and_pp1_to_pp2(gpu_peer, gpu_transport, dtype):
    desc, spec, seed = gpu_peer[dtype]
    expected = random_pool(spec, seed)
    peer = gpu_transport.open_peer(desc)
    src_ids = [9, 2, 4]
    for rank in range(2):
        dst = torch.zeros((3, 4, 2, 2, 8, 16), dtype=dtype, device="cuda")
        kv_slice = KVSlice(src_head_start=2 * rank, num_heads=2)
        handle = gpu_transport.submit(peer, dst, src_ids, [0, 1, 2], kv_slice)
        assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
        heads = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(bits(dst.cpu()), bits(expected[src_ids][:, :, :, heads]))
    for stage in range(2):
        dst = torch.zeros((3, 2, 2, 4, 8, 16), dtype=dtype, device="cuda")
        kv_slice = KVSlice(src_layer_start=2 * stage, num_layers=2)
        handle = gpu_transport.submit(peer, dst, src_ids, [2, 0, 1], kv_slice)
        assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
        layers = slice(2 * stage, 2 * stage + 2)
        assert torch.equal(bits(dst.cpu()[[2, 0, 1]]), bits(expected[src_ids][:, layers]))


@pytest.mark.cuda
def test_cuda_peer_gone_after_exit():
    process = PeerProcess("cuda_ipc")
    desc = PoolDescriptor.from_bytes(process.alloc(KVCacheSpec(**SRC), 0))
    process.exit()
    with (
        create_transport("cuda_ipc") as transport,
        pytest.raises(PeerUnavailableError, match=f"process {process.pid}"),
    ):
        transport.open_peer(desc)

"""The CUDA kernels run on CPU by the emulator of the CUDA execution model.

``distserve_rt._cuda_emu`` is the CUDA module's launchers and kernels compiled by the host
compiler (csrc/cuda_emu/README.md): each CUDA thread a fiber, ``__syncthreads`` and warp
collectives checked for missing or divergent arrivals, ``ldmatrix``/``mma.sync`` computed
from the PTX fragment layouts, ``cp.async`` destinations NaN until the wait that retires
them, and buffers that end at a guard page. Each case runs with warps scheduled forward,
reversed and shuffled. The ops go through the same Python wrappers, input builders and
plain-torch references as the CPU and CUDA tests (the wrappers' native module is swapped
for the emulated one); inputs and outputs are copied into guarded buffers.

The quick grid runs in ``make test``; ``pytest -m emu_wide`` runs the wider grid.
``DRT_CUDA_EMU_MODULE=<path to a .so>`` tests another build of the module (e.g. one with a
planted bug, bench/gpu/plant_bugs.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import zlib

import numpy as np
import pytest
import torch

from distserve_rt import _native
from distserve_rt.core.kv_cache import KVCacheSpec, layer_view
from distserve_rt.ops import decode_attention, prefill_attention
from distserve_rt.ops.cache import copy_blocks, reference_copy_blocks, reference_write_kv, write_kv
from distserve_rt.ops.prefill_attention import reference_prefill_attention
from distserve_rt.transfer.fake import reference_transfer
from tests.kernels.cache_helpers import make_slot_mapping, randn, random_pool
from tests.kernels.native_abi import ABI, arg_names
from tests.kernels.test_decode_attention import assert_matches_reference, make_inputs
from tests.kernels.test_prefill_attention import (
    TILE_ROUTES,
    assert_close,
    cu_seqlens_of,
    paged_prefix,
    random_qkv,
)


def _load_emulator():
    path = os.environ.get("DRT_CUDA_EMU_MODULE")
    if not path:
        if platform.machine() not in ("x86_64", "AMD64"):  # fiber switch is x86-64 only
            return pytest.importorskip("distserve_rt._cuda_emu")
        return importlib.import_module("distserve_rt._cuda_emu")  # built by every make build
    spec = importlib.util.spec_from_file_location("_cuda_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EMU = _load_emulator()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
WARP_ORDERS = ["forward", "reverse", "random"]
wide = pytest.mark.emu_wide


class _EmulatedModule:
    """What the op wrappers see as the native module: the emulated CUDA ops, `stream` 0.
    decode_attention's scratch workspace (allocated by its wrapper) is swapped for a
    guarded buffer of the same size, so the split kernel's writes are bounds-checked too."""

    def __getattr__(self, name: str):
        op = getattr(EMU, name)

        def call(**kwargs):
            workspace = None
            if name == "decode_attention" and kwargs["workspace_bytes"] > 0:
                workspace = EMU.alloc(nbytes=kwargs["workspace_bytes"])
                kwargs["workspace"] = workspace.address
            return op(**kwargs, stream=0)

        return call


@pytest.fixture(params=WARP_ORDERS)
def emulated(request, monkeypatch):
    """Routes the ops on CPU tensors to the emulated CUDA kernels, under one warp order."""
    EMU.set_warp_order(order=request.param, seed=zlib.crc32(request.node.nodeid.encode()))
    module = _EmulatedModule()
    monkeypatch.setattr(_native, "module_for", lambda device: module)
    return EMU


def guarded(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor`, same shape and strides, in an emulator buffer that ends right after
    its last element (at a guard page): a kernel touching anything past it raises."""
    if tensor.numel() == 0:
        return tensor.clone()
    pairs = zip(tensor.shape, tensor.stride(), strict=True)
    extent = 1 + sum((size - 1) * stride for size, stride in pairs)
    nbytes = extent * tensor.element_size()
    buffer = EMU.alloc(nbytes=nbytes, alignment=16 if nbytes % 16 == 0 else tensor.element_size())
    flat = torch.frombuffer(buffer, dtype=torch.uint8).view(tensor.dtype)
    out = flat.as_strided(tensor.shape, tensor.stride())
    out.copy_(tensor)
    return out


def guarded_nan_like(tensor: torch.Tensor) -> torch.Tensor:
    return guarded(torch.full_like(tensor, float("nan")))


# ---- prefill attention ---------------------------------------------------------------------


def run_prefill(q, k, v, cu_seqlens, **cache_args):
    """prefill_attention on guarded copies; returns the output (and the cache it wrote)."""
    cache_args = {name: guarded(t) if t is not None else None for name, t in cache_args.items()}
    out = guarded_nan_like(q)
    q, k, v, cu_seqlens = (guarded(t) for t in (q, k, v, cu_seqlens))
    result = prefill_attention(q, k, v, cu_seqlens, out=out, **cache_args)
    assert result is out
    return out, cache_args.get("kv_cache")


def check_prefill(dtype, head_dim, group, route, generator):
    num_kv_heads = 2
    seq_lens = TILE_ROUTES[route](group)
    q, k, v = random_qkv(
        seq_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, "cpu", generator
    )
    cu_seqlens = cu_seqlens_of(seq_lens, "cpu")
    out, _ = run_prefill(q, k, v, cu_seqlens)
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("route", list(TILE_ROUTES))
def test_prefill_matches_reference(emulated, generator, dtype, head_dim, group, route):
    """fp16/bf16: the tensor-core kernel (ldmatrix, mma.sync) on 128-row M tiles (32 rows a
    warp) or, when every sequence fits 64 rows, 64-row tiles; fp32: the SIMT kernel."""
    check_prefill(dtype, head_dim, group, route, generator)


@wide
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [2, 3, 8])
@pytest.mark.parametrize("route", list(TILE_ROUTES))
def test_prefill_matches_reference_wide(emulated, generator, dtype, head_dim, group, route):
    check_prefill(dtype, head_dim, group, route, generator)


def check_paged_prefill(dtype, block_size, group, write_kv, generator):
    prefix_lens, seq_lens = [0, 5, 70, 17, 64], [3, 1, 30, 64, 9]
    num_kv_heads, head_dim = 2, 64
    q, k, v = random_qkv(
        seq_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, "cpu", generator
    )
    kv_cache, block_table, prefix, slots = paged_prefix(
        prefix_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, "cpu", generator
    )
    expected_cache = kv_cache.clone()
    cu_seqlens = cu_seqlens_of(seq_lens, "cpu")
    slot_mapping = slots if write_kv else None
    out, cache = run_prefill(
        q,
        k,
        v,
        cu_seqlens,
        kv_cache=kv_cache,
        block_table=block_table,
        prefix_lens=prefix,
        slot_mapping=slot_mapping,
    )
    expected = reference_prefill_attention(
        q,
        k,
        v,
        cu_seqlens,
        kv_cache=expected_cache,
        block_table=block_table,
        prefix_lens=prefix,
        slot_mapping=slot_mapping,
    )
    assert_close(out, expected)
    assert torch.equal(cache, expected_cache)  # the fused write, bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_paged_prefix_and_fused_kv_write(emulated, generator, dtype, group):
    check_paged_prefill(dtype, 16, group, True, generator)


@wide
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("write_kv", [False, True], ids=["read_only", "slot_mapping"])
def test_prefill_paged_prefix_wide(emulated, generator, dtype, block_size, group, write_kv):
    check_paged_prefill(dtype, block_size, group, write_kv, generator)


# ---- decode attention ----------------------------------------------------------------------


def check_decode(dtype, head_dim, group, block_size, generator, seq_lens=None):
    # 1100 tokens and the block table's capacity as max_seq_len: 3+ splits and the merge,
    # with some splits of the shorter sequences empty.
    seq_lens = seq_lens or [1, block_size - 1, 37, 1100, 2 * block_size]
    query, kv_cache, block_table, lens = make_inputs(
        seq_lens,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        generator=generator,
    )
    capacity = block_table.shape[1] * block_size
    guarded_args = [guarded(t) for t in (query, kv_cache, block_table, lens)]
    out = guarded_nan_like(query)
    decode_attention(*guarded_args, max_seq_len=capacity, out=out)
    assert_matches_reference(out, query, kv_cache, block_table, lens)


# fp16/bf16 groups >= 4 take the tensor-core kernel (decode_mma.cuh), the rest the SIMT one;
# group 32 is two head tiles of the tensor-core kernel's 16 M rows.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("group", "block_size"), [(1, 8), (4, 16), (8, 32), (32, 8)])
def test_decode_split_and_merge_match_reference(
    emulated, generator, dtype, head_dim, group, block_size
):
    check_decode(dtype, head_dim, group, block_size, generator)


@wide
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 6, 8, 16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_wide(emulated, generator, dtype, head_dim, group, block_size):
    check_decode(dtype, head_dim, group, block_size, generator, seq_lens=[3000, 1, 513, 77])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("max_seq_len", [128, 1024], ids=["one_split", "splits"])
def test_decode_bad_block_id_and_seq_len_give_nan(emulated, generator, dtype, group, max_seq_len):
    """The kernels' own defence (the Python wrapper refuses these before launching): a block id
    out of range makes its sequence's rows NaN, as does a seq_len the block table cannot hold;
    the other sequences are unaffected. Block 3 of sequence 0 (64 tokens) is exactly the last
    warp's only 16-key slice in the tensor-core kernel: a warp that saw nothing but NaN keys
    keeps max -inf, and its NaN must still reach the combined output."""
    block_size = 16
    query, kv_cache, block_table, lens = make_inputs(
        [64, 40, 20],
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
        block_size=block_size,
        dtype=dtype,
        generator=generator,
    )
    block_table[0, 3] = kv_cache.shape[0] + 5
    lens[2] = block_table.shape[1] * block_size + 1
    query, kv_cache, block_table, lens = (guarded(t) for t in (query, kv_cache, block_table, lens))
    out = guarded(torch.zeros_like(query))  # NaN only where the kernel writes it
    workspace_bytes = EMU.decode_attention_workspace_bytes(
        batch=3, num_heads=2 * group, head_dim=64, max_seq_len=max_seq_len, stream=0
    )
    workspace = EMU.alloc(nbytes=max(workspace_bytes, 16))
    EMU.decode_attention(
        query=query.data_ptr(),
        out=out.data_ptr(),
        kv_cache=kv_cache.data_ptr(),
        block_table=block_table.data_ptr(),
        seq_lens=lens.data_ptr(),
        workspace=workspace.address,
        workspace_bytes=workspace_bytes,
        batch=3,
        max_seq_len=max_seq_len,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
        query_stride=query.stride(0),
        out_stride=out.stride(0),
        softmax_scale=0.125,
        num_blocks=kv_cache.shape[0],
        block_size=block_size,
        kv_block_stride=kv_cache.stride(0),
        max_blocks_per_seq=block_table.shape[1],
        dtype=_native.dtype_code(dtype),
        stream=0,
    )
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert_matches_reference(out[1:2], query[1:2], kv_cache, block_table[1:2], lens[1:2], 0.125)


# ---- KV pool kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(4, 64), (1, 128), (2, 4)])
def test_write_kv_matches_reference(emulated, generator, dtype, num_kv_heads, head_dim):
    """head_dim 4: rows of 8 or 16 bytes go through the element-wise (not uint4) kernel."""
    block_size = 16
    spec = KVCacheSpec(9, 2, num_kv_heads, head_dim, block_size, dtype)
    slot_mapping = make_slot_mapping(
        block_size, 9, [2 * block_size + 5, 7, 1], [13, 0, 5], 3, generator
    )
    num_tokens = slot_mapping.numel()
    key = randn((num_tokens, num_kv_heads, head_dim), dtype, generator, "cpu")
    value = randn((num_tokens, num_kv_heads, head_dim), dtype, generator, "cpu")
    pool = guarded(random_pool(spec, generator, "cpu"))
    expected = layer_view(pool, 1).clone()
    reference_write_kv(key, value, expected, slot_mapping)
    write_kv(guarded(key), guarded(value), layer_view(pool, 1), guarded(slot_mapping))
    assert torch.equal(layer_view(pool, 1), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_shape", [(2, 2, 4, 16, 64), (3, 5)], ids=["pool", "odd_bytes"])
def test_copy_blocks_matches_reference(emulated, generator, dtype, block_shape):
    """Whole pool blocks (uint4 words, several CTAs per block) and 6- or 12-byte blocks
    (the 2- and 4-byte word kernels)."""
    src = guarded(randn((12, *block_shape), dtype, generator, "cpu"))
    dst = guarded(randn((7, *block_shape), dtype, generator, "cpu"))
    mapping = torch.tensor([[11, 6], [0, 0], [4, 2], [4, 5], [9, 1]])
    expected = dst.clone()
    reference_copy_blocks(src, expected, mapping)
    copy_blocks(src, dst, guarded(mapping))
    assert torch.equal(dst, expected)


# (src_layer_start, dst_layer_start, num_layers, src_head_start, dst_head_start, num_heads)
SLICES = [(0, 0, 3, 0, 0, 4), (0, 0, 3, 1, 0, 2), (1, 1, 2, 0, 0, 4), (2, 0, 1, 3, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_slice", SLICES, ids=range(len(SLICES)))
def test_block_slice_kernel_matches_reference(emulated, generator, dtype, kv_slice):
    """The cuda_ipc backend's kernel: whole blocks (one merged run) and layer / head slices
    (one run per layer and K|V), against the transfer reference."""
    src = guarded(randn((6, 3, 2, 4, 8, 8), dtype, generator, "cpu"))
    dst_heads = 4 if kv_slice[5] == 4 else 3
    dst = guarded(randn((5, 3, 2, dst_heads, 8, 8), dtype, generator, "cpu"))
    mapping = np.array([[5, 0], [0, 3], [2, 4]])
    expected = dst.clone()
    reference_transfer(src, expected, mapping, kv_slice)
    block_mapping = guarded(torch.from_numpy(mapping))

    def pool(t):
        return (t.shape[0], t.shape[1], t.shape[3], t.stride(0) * t.element_size())

    EMU.copy_block_slices(
        src=src.data_ptr(),
        dst=dst.data_ptr(),
        block_mapping=block_mapping.data_ptr(),
        num_pairs=len(mapping),
        src_pool=pool(src),
        dst_pool=pool(dst),
        head_bytes=8 * 8 * src.element_size(),
        slice=kv_slice,
        stream=0,
    )
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("op", list(ABI))
def test_ops_take_the_cuda_module_keywords(op):
    """The same keyword ABI as _C and _cuda (op_args.h), with _cuda's `stream`."""
    assert arg_names(getattr(EMU, op)) == [*ABI[op].split(), "stream"]

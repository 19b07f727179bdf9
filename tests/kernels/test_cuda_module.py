"""The CUDA module `distserve_rt._cuda`: what holds without a GPU (it imports, exports the
ABI, its launchers reject bad arguments before any CUDA call) and, marked `cuda`, that every
op agrees with the CPU module on the same inputs (the CPU side is checked against the
fp32 references in the op tests).

Tolerances (CUDA vs CPU): fp32 2e-5 abs/rel (two fp32 summation orders), fp16/bf16 2e-2
(both round the same fp32 result to 16 bits; the tensor-core prefill also rounds P).
"""

from __future__ import annotations

import math

import pytest
import torch

from distserve_rt import _native, ops
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view
from tests.kernels.native_abi import ABI, CUDA_ONLY, arg_names

BF16, FP16, FP32 = 2, 1, 0
FAKE = 1 << 20  # a 16-byte aligned non-null "pointer": never dereferenced by these checks


@pytest.fixture(scope="module")
def cuda_mod():
    if not _native.has_cuda_module():
        pytest.skip("distserve_rt._cuda is not built (nvcc was not found at build time)")
    return _native.cuda_module()


# ---- without a GPU -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({**ABI, **CUDA_ONLY}))
def test_exports_abi_with_trailing_stream(cuda_mod, name):
    expected = {**ABI, **CUDA_ONLY}[name].split() + ["stream"]
    assert arg_names(getattr(cuda_mod, name)) == expected


def test_device_count_without_driver_is_zero(cuda_mod):
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert cuda_mod.device_count() == expected


def test_workspace_bytes_follow_max_seq_len(cuda_mod):
    def size(batch, max_seq_len):
        return cuda_mod.decode_attention_workspace_bytes(
            batch=batch, num_heads=32, head_dim=128, max_seq_len=max_seq_len, stream=0
        )

    assert size(8, 128) == 0  # one split (the smallest, 128 tokens) writes the output directly
    sizes = [size(8, n) for n in (513, 2048, 8192, 1 << 20)]
    assert 0 < sizes[0] < sizes[1] < sizes[2] <= sizes[3]  # splits are capped
    assert size(16, 8192) >= 2 * sizes[2] - 256  # grows with the batch
    with pytest.raises(ValueError, match="max_seq_len must be >= 1, got 0"):
        size(8, 0)


def _decode_args(**overrides):
    args = dict(
        query=FAKE, out=FAKE, kv_cache=FAKE, block_table=FAKE, seq_lens=FAKE, workspace=FAKE,
        workspace_bytes=1 << 30, batch=4, max_seq_len=4096, num_heads=8, num_kv_heads=2,
        head_dim=128, query_stride=1024, out_stride=1024, softmax_scale=0.1, num_blocks=64,
        block_size=16, kv_block_stride=2 * 2 * 16 * 128, max_blocks_per_seq=256, dtype=BF16,
        stream=0,
    )  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(head_dim=96, query_stride=768, out_stride=768), "head_dim 96 .* allowed: 64, 128"),
        (dict(block_size=12), "block_size 12 .* allowed: 8, 16, 32"),
        (dict(dtype=7), "dtype code 7"),
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a positive multiple"),
        (dict(workspace_bytes=16), "workspace_bytes .16. is less than"),
        (dict(softmax_scale=0.0), "softmax_scale must be a positive finite number"),
        (dict(query_stride=100), "query_stride .100. must be >="),
        (dict(kv_block_stride=10), "kv_block_stride .10. must be >="),
        (dict(query=FAKE + 2), "query must be 16-byte aligned"),
        (dict(batch=70000), r"batch must be in \[0, 65535\]"),
    ],
)
def test_decode_launcher_rejects(cuda_mod, overrides, message):
    with pytest.raises(ValueError, match=message):
        cuda_mod.decode_attention(**_decode_args(**overrides))


def _prefill_args(**overrides):
    args = dict(
        query=FAKE, key=FAKE, value=FAKE, out=FAKE, cu_seqlens=FAKE, batch=2, num_tokens=64,
        max_seqlen_q=32, num_heads=8, num_kv_heads=2, head_dim=64, query_token_stride=512,
        key_token_stride=128, value_token_stride=128, out_token_stride=512, softmax_scale=0.125,
        kv_cache=0, block_table=0, prefix_lens=0, slot_mapping=0, num_blocks=0, block_size=16,
        kv_block_stride=0, max_blocks_per_seq=0, dtype=FP16, stream=0,
    )  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(head_dim=80), "head_dim 80 .* allowed: 64, 128"),
        (dict(prefix_lens=FAKE), "block_table, prefix_lens and slot_mapping need a kv_cache"),
        (dict(slot_mapping=FAKE), "block_table, prefix_lens and slot_mapping need a kv_cache"),
        (
            dict(kv_cache=FAKE, prefix_lens=FAKE, num_blocks=8, kv_block_stride=4096),
            "block_table and prefix_lens must be given together",
        ),
        (dict(kv_cache=FAKE, num_blocks=8, kv_block_stride=64), "kv_block_stride .64."),
        (dict(key_token_stride=64), "key_token_stride .64. must be >="),
        (dict(num_heads=3), r"num_heads \(3\) must be a positive multiple"),
        (dict(softmax_scale=math.inf), "softmax_scale"),
        (dict(out=FAKE + 4), "out must be 16-byte aligned"),
        (dict(dtype=-1), "dtype code -1"),
    ],
)
def test_prefill_launcher_rejects(cuda_mod, overrides, message):
    with pytest.raises(ValueError, match=message):
        cuda_mod.prefill_attention(**_prefill_args(**overrides))


def test_cache_launchers_reject(cuda_mod):
    write = dict(
        key=FAKE, value=FAKE, kv_cache=FAKE, slot_mapping=FAKE, num_tokens=4, num_kv_heads=2,
        head_dim=64, key_token_stride=128, value_token_stride=128, num_blocks=4, block_size=16,
        kv_block_stride=100, dtype=BF16, stream=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"kv_block_stride \(100\) must be >= 2 \*"):
        cuda_mod.write_kv(**write)
    copy = dict(
        src=FAKE, dst=FAKE, block_mapping=FAKE, num_pairs=2, src_num_blocks=4, dst_num_blocks=4,
        src_block_stride_bytes=64, dst_block_stride_bytes=64, block_bytes=0, stream=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="block_bytes must be >= 1, got 0"):
        cuda_mod.copy_blocks(**copy)
    with pytest.raises(ValueError, match="needs a non-default stream"):
        cuda_mod.copy_blocks_memcpy_batch(**{**copy, "block_bytes": 64})


# ---- on a GPU: the same inputs through the CPU and the CUDA module --------------------------

CUDA = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _rand(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def _pool(gen, num_blocks, num_kv_heads, head_dim, block_size, dtype) -> torch.Tensor:
    spec = KVCacheSpec(num_blocks, 2, num_kv_heads, head_dim, block_size, dtype)
    pool = allocate_kv_pool(spec)
    pool.copy_(_rand(spec.shape, dtype, gen))
    return pool  # [num_blocks, 2 layers, 2, num_kv_heads, block_size, head_dim]


def _block_tables(gen, seq_lens, block_size) -> tuple[int, torch.Tensor]:
    """A pool size and a block table [batch, max_blocks_per_seq] of distinct shuffled ids
    (a pool after some churn), with spare blocks that no sequence uses."""
    max_blocks = max(math.ceil(n / block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    ids = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * max_blocks]
    return num_blocks, ids.view(len(seq_lens), max_blocks).to(torch.int32)


def _to_cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 6])  # 6: no 16-byte vectors (scalar path)
def test_write_kv_matches_cpu(generator, dtype, head_dim):
    num_tokens, num_kv_heads, block_size, num_blocks = 50, 2, 16, 12
    pool = _pool(generator, num_blocks, num_kv_heads, head_dim, block_size, dtype)
    key = _rand((num_tokens, num_kv_heads, head_dim), dtype, generator)
    value = _rand((num_tokens, num_kv_heads, head_dim), dtype, generator)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[::7] = -1  # padding tokens
    pool_gpu, key_gpu, value_gpu, slots_gpu = _to_cuda(pool.clone(), key, value, slots)
    ops.write_kv(key, value, layer_view(pool, 1), slots)
    ops.write_kv(key_gpu, value_gpu, layer_view(pool_gpu, 1), slots_gpu)
    torch.cuda.synchronize()
    assert torch.equal(pool_gpu.cpu(), pool)


@CUDA
def test_write_kv_never_writes_past_the_pool(generator):
    # The pool handed to the op is a prefix of a larger buffer: slots past it must be skipped.
    buffer = _pool(generator, 6, 2, 64, 8, torch.bfloat16).cuda()
    guard = buffer[4:].clone()
    key = _rand((3, 2, 64), torch.bfloat16, generator).cuda()
    slots = torch.tensor([0, 4 * 8, 5 * 8 + 3], device="cuda")  # two slots out of range
    ops.write_kv(key, key, layer_view(buffer[:4], 0), slots)
    torch.cuda.synchronize()
    assert torch.equal(buffer[4:], guard)
    assert torch.equal(buffer[0, 0, 0, :, 0], key[0])


@CUDA
@pytest.mark.parametrize("block_shape", [(2, 4, 16), (3, 2), (3, 5)])  # 16-, 4-, 2-byte words
def test_copy_blocks_matches_cpu_and_memcpy_batch(generator, block_shape):
    src = _rand((10, *block_shape), torch.float16, generator)
    dst = _rand((7, *block_shape), torch.float16, generator)
    mapping = torch.tensor([[3, 0], [9, 6], [0, 2], [4, 5]])
    src_gpu, dst_gpu, mapping_gpu = _to_cuda(src, dst.clone(), mapping)
    batch_dst = dst_gpu.clone()
    ops.copy_blocks(src, dst, mapping)
    ops.copy_blocks(src_gpu, dst_gpu, mapping_gpu)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    block_bytes = src_gpu[0].nbytes
    with torch.cuda.stream(stream):
        _native.cuda_module().copy_blocks_memcpy_batch(
            src=src_gpu.data_ptr(), dst=batch_dst.data_ptr(), block_mapping=mapping.data_ptr(),
            num_pairs=4, src_num_blocks=10, dst_num_blocks=7, src_block_stride_bytes=block_bytes,
            dst_block_stride_bytes=block_bytes, block_bytes=block_bytes, stream=stream.cuda_stream,
        )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(dst_gpu.cpu(), dst)
    assert torch.equal(batch_dst.cpu(), dst)


@CUDA
def test_copy_blocks_skips_ids_out_of_range(generator):
    src = _rand((4, 256), torch.bfloat16, generator).cuda()
    dst = _rand((4, 256), torch.bfloat16, generator).cuda()
    expected = dst.clone()
    expected[1] = src[2]
    mapping = torch.tensor([[2, 1], [7, 0], [0, -1], [1, 4]], device="cuda")
    _native.cuda_module().copy_blocks(
        src=src.data_ptr(), dst=dst.data_ptr(), block_mapping=mapping.data_ptr(), num_pairs=4,
        src_num_blocks=4, dst_num_blocks=4, src_block_stride_bytes=512, dst_block_stride_bytes=512,
        block_bytes=512, stream=torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(dst, expected)


DECODE_GRID = [
    # (num_heads, num_kv_heads, seq_lens): MHA, GQA 4, MQA 16 (head tiles), splits > 1
    (4, 4, [1, 17, 300]),
    (8, 2, [33, 700, 1500]),
    (16, 1, [5, 1029]),
    (12, 2, [2100, 64]),
]


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads, num_kv_heads, seq_lens", DECODE_GRID)
def test_decode_attention_matches_cpu(
    generator, dtype, head_dim, block_size, num_heads, num_kv_heads, seq_lens
):
    num_blocks, block_table = _block_tables(generator, seq_lens, block_size)
    pool = _pool(generator, num_blocks, num_kv_heads, head_dim, block_size, dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    query = _rand((len(seq_lens), num_heads, head_dim), dtype, generator)
    expected = ops.decode_attention(query, layer_view(pool, 1), block_table, seq_lens_t)
    query_gpu, pool_gpu, table_gpu, lens_gpu = _to_cuda(query, pool, block_table, seq_lens_t)
    out = ops.decode_attention(
        query_gpu, layer_view(pool_gpu, 1), table_gpu, lens_gpu, max_seq_len=max(seq_lens)
    )
    torch.testing.assert_close(out.cpu(), expected, **_tol(dtype))


@CUDA
def test_decode_attention_bad_block_id_gives_nan_row(generator):
    pool = _pool(generator, 8, 2, 128, 16, torch.bfloat16).cuda()
    block_table = torch.tensor([[0, 1], [2, 99]], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([20, 20], dtype=torch.int32, device="cuda")
    query = _rand((2, 4, 128), torch.bfloat16, generator).cuda()
    out = ops.decode_attention(query, layer_view(pool, 0), block_table, seq_lens, max_seq_len=32)
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all()


@CUDA
def test_decode_attention_replays_in_cuda_graph(generator):
    # max_seq_len 1024 -> two splits: the split kernel, the merge kernel and the workspace
    # allocation are all captured.
    pool = _pool(generator, 300, 2, 128, 16, torch.float16).cuda()
    block_table = torch.randperm(300, generator=generator)[:256].view(4, 64).to(torch.int32)
    block_table = block_table.cuda()
    seq_lens = torch.tensor([1000, 100, 600, 1], dtype=torch.int32, device="cuda")
    query = _rand((4, 8, 128), torch.float16, generator).cuda()
    kv_cache = layer_view(pool, 0)
    expected = ops.decode_attention(query, kv_cache, block_table, seq_lens, max_seq_len=1024)
    out = torch.full_like(query, float("nan"))
    ops.decode_attention(query, kv_cache, block_table, seq_lens, max_seq_len=1024, out=out)
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_attention(query, kv_cache, block_table, seq_lens, max_seq_len=1024, out=out)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


PREFILL_GRID = [
    # (num_heads, num_kv_heads, new tokens per sequence, prefix tokens per sequence)
    (4, 4, [1, 70, 130], None),
    (8, 2, [65, 3, 200], None),
    (6, 1, [40, 90], [0, 37]),
    (8, 4, [17, 64], [100, 5]),
]


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads, num_kv_heads, num_new, num_prefix", PREFILL_GRID)
@pytest.mark.parametrize("write_kv", [False, True])
def test_prefill_attention_matches_cpu(
    generator, dtype, head_dim, num_heads, num_kv_heads, num_new, num_prefix, write_kv
):
    block_size = 16
    prefix = num_prefix or [0] * len(num_new)
    totals = [p + n for p, n in zip(prefix, num_new, strict=True)]
    num_blocks, block_table = _block_tables(generator, totals, block_size)
    pool = _pool(generator, num_blocks, num_kv_heads, head_dim, block_size, dtype)
    cu_seqlens = torch.tensor([0, *torch.tensor(num_new).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(cu_seqlens[-1])
    query = _rand((num_tokens, num_heads, head_dim), dtype, generator)
    key = _rand((num_tokens, num_kv_heads, head_dim), dtype, generator)
    value = _rand((num_tokens, num_kv_heads, head_dim), dtype, generator)
    paged = num_prefix is not None or write_kv
    slots = None
    if write_kv:  # slot of new token j of sequence i: position prefix[i] + j in its blocks
        pos = [p + j for p, n in zip(prefix, num_new, strict=True) for j in range(n)]
        seq = [i for i, n in enumerate(num_new) for _ in range(n)]
        blocks = block_table[torch.tensor(seq), torch.tensor(pos) // block_size].long()
        slots = blocks * block_size + torch.tensor(pos) % block_size
    kwargs = dict(
        kv_cache=layer_view(pool, 1) if paged else None,
        block_table=block_table if num_prefix is not None else None,
        prefix_lens=torch.tensor(prefix, dtype=torch.int32) if num_prefix is not None else None,
        slot_mapping=slots,
    )
    pool_gpu = pool.cuda()
    expected = ops.prefill_attention(query, key, value, cu_seqlens, **kwargs)
    gpu_kwargs = {k: (None if v is None else v.cuda()) for k, v in kwargs.items()}
    if paged:
        gpu_kwargs["kv_cache"] = layer_view(pool_gpu, 1)
    query_gpu, key_gpu, value_gpu, cu_gpu = _to_cuda(query, key, value, cu_seqlens)
    out = ops.prefill_attention(
        query_gpu, key_gpu, value_gpu, cu_gpu, max_seqlen=max(num_new), **gpu_kwargs
    )
    torch.testing.assert_close(out.cpu(), expected, **_tol(dtype))
    assert torch.equal(pool_gpu.cpu(), pool)  # the fused write_kv wrote the same slots


@CUDA
def test_prefill_attention_prefix_out_of_range_gives_nan_rows(generator):
    pool = _pool(generator, 8, 1, 64, 16, torch.bfloat16).cuda()
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    prefix_lens = torch.tensor([10, 40], dtype=torch.int32, device="cuda")  # 40 > 2 blocks
    cu_seqlens = torch.tensor([0, 5, 9], dtype=torch.int32, device="cuda")
    query = _rand((9, 2, 64), torch.bfloat16, generator).cuda()
    key = _rand((9, 1, 64), torch.bfloat16, generator).cuda()
    out = ops.prefill_attention(
        query, key, key, cu_seqlens, max_seqlen=5, kv_cache=layer_view(pool, 0),
        block_table=block_table, prefix_lens=prefix_lens,
    )  # fmt: skip
    torch.cuda.synchronize()
    assert torch.isfinite(out[:5]).all()
    assert torch.isnan(out[5:]).all()

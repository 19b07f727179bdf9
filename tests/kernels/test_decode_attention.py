"""decode_attention against the plain-torch reference, plus its argument checks.

Inputs are fresh random values from the seeded `generator`, in a KV cache that is one layer's
view of a multi-layer pool (non-contiguous dim 0), read through shuffled block ids.
Tolerances: float32 1e-5 (abs and rel); bfloat16/float16 2e-2 (the output is rounded to the
16-bit type, the math is fp32 on both sides).
"""

from __future__ import annotations

import pytest
import torch

from distserve_rt import _native
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view
from distserve_rt.ops.decode_attention import decode_attention, reference_decode_attention
from tests.kernels.cuda_head_dims import skip_without_cuda_kernel

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = list(TOLERANCE)


def make_inputs(
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    spare_blocks: int = 3,
):
    """query, kv_cache (layer 1 of a 2-layer pool), block_table (shuffled ids, unused entries
    -1) and seq_lens for one decode step."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: the table is wider than needed
    num_blocks = sum(blocks_per_seq) + spare_blocks
    spec = KVCacheSpec(num_blocks, 2, num_kv_heads, head_dim, block_size, dtype)
    pool = allocate_kv_pool(spec, device)
    pool.copy_(torch.randn(spec.shape, generator=generator).to(dtype))
    kv_cache = layer_view(pool, 1)  # [num_blocks, 2, num_kv_heads, block_size, head_dim]
    ids = torch.randperm(num_blocks, generator=generator).tolist()
    block_table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return query.to(device), kv_cache, block_table.to(device), lens.to(device)


def assert_matches_reference(out, query, kv_cache, block_table, seq_lens, softmax_scale=None):
    expected = reference_decode_attention(
        query, kv_cache, block_table, seq_lens, softmax_scale=softmax_scale
    )
    tol = TOLERANCE[query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_matches_reference(device, generator, dtype, head_dim, group, block_size):
    # Lengths: a single token, one short of a block, non-multiples, several chunks.
    seq_lens = [1, block_size - 1, 37, 300, 2 * block_size]
    query, kv_cache, block_table, seq_lens = make_inputs(
        seq_lens,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        generator=generator,
        device=device,
    )
    out = decode_attention(query, kv_cache, block_table, seq_lens)
    assert out.shape == query.shape and out.dtype == dtype
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_long_contexts_split_across_threads(device, generator, restore_num_threads, dtype, threads):
    """Few (sequence, kv head) items and thousands of tokens: the kernel splits each sequence
    and merges the partial results; the split count follows the thread count."""
    _native.set_num_threads(threads)
    seq_lens = [3000, 1, 1531]
    query, kv_cache, block_table, seq_lens = make_inputs(
        seq_lens,
        num_heads=4,
        num_kv_heads=1,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        generator=generator,
        device=device,
    )
    if device.type == "cpu":  # the plan splits: the partial rows need scratch
        assert (
            _native.cpu_module().decode_attention_workspace_bytes(
                batch=3, num_heads=4, head_dim=128, max_seq_len=3000
            )
            > 0
        )
    out = decode_attention(query, kv_cache, block_table, seq_lens)
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens)


def test_workspace_is_zero_when_there_is_no_split():
    # 64 sequences of 8 kv heads keep any thread count busy; 200 tokens is below one split.
    assert (
        _native.cpu_module().decode_attention_workspace_bytes(
            batch=64, num_heads=32, head_dim=128, max_seq_len=200
        )
        == 0
    )
    assert (
        _native.cpu_module().decode_attention_workspace_bytes(
            batch=1, num_heads=32, head_dim=128, max_seq_len=8192
        )
        > 0
    )


@pytest.mark.parametrize("head_dim", [40, 80, 256])
def test_other_head_dims(device, generator, head_dim):
    skip_without_cuda_kernel(device, head_dim)
    query, kv_cache, block_table, seq_lens = make_inputs(
        [5, 700, 16],
        num_heads=6,
        num_kv_heads=3,
        head_dim=head_dim,
        block_size=16,
        dtype=torch.float32,
        generator=generator,
        device=device,
    )
    out = decode_attention(query, kv_cache, block_table, seq_lens)
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_scale_strided_query_and_out(device, generator, dtype):
    query, kv_cache, block_table, seq_lens = make_inputs(
        [33, 1, 260],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=8,
        dtype=dtype,
        generator=generator,
        device=device,
    )
    # query and out as dim-0-strided views, as when they are slices of a fused buffer
    fused_query = torch.randn(3, 2, 8, 64, generator=generator).to(dtype).to(device)
    fused_query[:, 1] = query
    query = fused_query[:, 1]
    fused_out = torch.full((3, 3, 8, 64), 7.0, dtype=dtype, device=device)
    out = fused_out[:, 0]
    result = decode_attention(
        query, kv_cache, block_table, seq_lens, softmax_scale=0.3, out=out, max_seq_len=512
    )
    assert result is out
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens, softmax_scale=0.3)
    assert torch.all(fused_out[:, 1:] == 7.0)  # nothing written outside `out`


def test_contiguous_kv_cache_and_empty_batch(device, generator):
    query, kv_cache, block_table, seq_lens = make_inputs(
        [100, 3],
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        block_size=32,
        dtype=torch.float16,
        generator=generator,
        device=device,
    )
    kv_cache = kv_cache.contiguous()
    out = decode_attention(query, kv_cache, block_table, seq_lens)
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens)
    empty = decode_attention(query[:0], kv_cache, block_table[:0], seq_lens[:0])
    assert empty.shape == (0, 4, 64)


# ---- bad input ------------------------------------------------------------------------


@pytest.fixture
def inputs(generator):
    """A small valid CPU case: query [2, 8, 64], 2 kv heads, block size 16."""
    return make_inputs(
        [20, 40],
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        generator=generator,
    )


def _replace(inputs, **changes):
    query, kv_cache, block_table, seq_lens = inputs
    args = dict(query=query, kv_cache=kv_cache, block_table=block_table, seq_lens=seq_lens)
    args.update(changes)
    return args


BAD_TENSORS = {
    "query float64": (lambda q, kv, bt, sl: {"query": q.double()}, r"query has dtype"),
    "query 2-d": (lambda q, kv, bt, sl: {"query": q[0]}, r"query must have 3 dimensions"),
    "kv_cache dtype": (lambda q, kv, bt, sl: {"kv_cache": kv.half()}, r"kv_cache has dtype"),
    "kv_cache head_dim": (
        lambda q, kv, bt, sl: {"kv_cache": kv[..., :32]},
        r"kv_cache has shape .*dimension 4 must be 64",
    ),
    "kv_cache not K and V": (
        lambda q, kv, bt, sl: {"kv_cache": kv[:, :1]},
        r"dimension 1 must be 2",
    ),
    "kv_cache inner strides": (
        lambda q, kv, bt, sl: {"kv_cache": kv.transpose(3, 4).contiguous().transpose(3, 4)},
        r"kv_cache must be contiguous in dimensions 1",
    ),
    "num_heads not a multiple": (
        lambda q, kv, bt, sl: {"query": q[:, :7]},
        r"num_heads \(7\) must be a positive multiple of num_kv_heads \(2\)",
    ),
    "block_table int64": (
        lambda q, kv, bt, sl: {"block_table": bt.long()},
        r"block_table has dtype torch.int64; allowed: int32",
    ),
    "block_table batch": (lambda q, kv, bt, sl: {"block_table": bt[:1]}, r"block_table has shape"),
    "block_table strided": (
        lambda q, kv, bt, sl: {"block_table": bt[:, ::2]},
        r"block_table must be contiguous",
    ),
    "seq_lens int64": (lambda q, kv, bt, sl: {"seq_lens": sl.long()}, r"seq_lens has dtype"),
    "seq_lens batch": (lambda q, kv, bt, sl: {"seq_lens": sl[:1]}, r"seq_lens has shape"),
    "kv_cache device": (
        lambda q, kv, bt, sl: {"kv_cache": torch.empty(kv.shape, device="meta")},
        r"kv_cache is on meta, it must be on cpu \(the device of query\)",
    ),
    "seq_lens device": (
        lambda q, kv, bt, sl: {"seq_lens": torch.empty(2, dtype=torch.int32, device="meta")},
        r"seq_lens is on meta, it must be on cpu \(the device of query\)",
    ),
    "seq_len 0": (
        lambda q, kv, bt, sl: {"seq_lens": torch.tensor([20, 0], dtype=torch.int32)},
        r"seq_lens\[1\] = 0 is out of range: must be in \[1, max_seq_len",
    ),
    "seq_len beyond the table": (
        lambda q, kv, bt, sl: {"seq_lens": torch.tensor([20, 65], dtype=torch.int32)},
        r"seq_lens\[1\] = 65 does not fit the block table: .* = 64",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_raise(inputs, case):
    change, message = BAD_TENSORS[case]
    with pytest.raises(ValueError, match=message):
        decode_attention(**_replace(inputs, **change(*inputs)))


@pytest.mark.parametrize("bad_id", [-1, 9])
def test_block_id_out_of_range_raises(inputs, bad_id):
    query, kv_cache, block_table, seq_lens = inputs
    num_blocks = kv_cache.shape[0]
    block_table = block_table.clone()
    block_table[1, 2] = bad_id if bad_id < 0 else num_blocks + bad_id
    with pytest.raises(ValueError, match=r"block_table\[1\]\[2\] = .* is out of range"):
        decode_attention(query, kv_cache, block_table, seq_lens)


def test_unused_block_table_entries_are_not_checked(inputs):
    query, kv_cache, block_table, seq_lens = inputs
    block_table = block_table.clone()
    block_table[0, 2:] = 10**6  # past seq_lens[0] = 20 tokens: never read
    out = decode_attention(query, kv_cache, block_table, seq_lens)
    assert_matches_reference(out, query, kv_cache, block_table, seq_lens)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"softmax_scale": -1.0}, r"softmax_scale must be a positive float"),
        ({"max_seq_len": 0}, r"max_seq_len must be an int >= 1, got 0"),
        ({"max_seq_len": 39}, r"seq_lens\[1\] = 40 is out of range: .*max_seq_len = 39"),
        ({"out": torch.empty(2, 8, 32)}, r"out has shape \(2, 8, 32\); it must match query"),
        ({"out": torch.empty(2, 8, 64, dtype=torch.float16)}, r"out has dtype torch.float16"),
    ],
)
def test_bad_options_raise(inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode_attention(*inputs, **kwargs)


def test_head_dim_above_limit_raises(generator):
    query = torch.randn(1, 2, 288, generator=generator)
    kv_cache = torch.randn(2, 2, 2, 16, 288, generator=generator)
    block_table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"head_dim 288; supported: 1..256"):
        decode_attention(query, kv_cache, block_table, torch.ones(1, dtype=torch.int32))


def _native_args(inputs, out, workspace_bytes, workspace=0, dtype_code=0):
    query, kv_cache, block_table, seq_lens = inputs
    return dict(
        query=query.data_ptr(),
        out=out.data_ptr(),
        kv_cache=kv_cache.data_ptr(),
        block_table=block_table.data_ptr(),
        seq_lens=seq_lens.data_ptr(),
        workspace=workspace,
        workspace_bytes=workspace_bytes,
        batch=2,
        max_seq_len=4096,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        query_stride=query.stride(0),
        out_stride=out.stride(0),
        softmax_scale=0.125,
        num_blocks=kv_cache.shape[0],
        block_size=16,
        kv_block_stride=kv_cache.stride(0),
        max_blocks_per_seq=block_table.shape[1],
        dtype=dtype_code,
    )


def test_native_checks_workspace_and_dtype(inputs, restore_num_threads):
    """The launcher refuses a workspace below what its split plan needs (the Python wrapper
    always sizes it; direct callers of the native ABI might not) and unknown dtype codes."""
    _native.set_num_threads(4)
    module = _native.cpu_module()
    out = torch.empty_like(inputs[0])
    needed = module.decode_attention_workspace_bytes(
        batch=2, num_heads=8, head_dim=64, max_seq_len=4096
    )
    assert needed > 0
    with pytest.raises(ValueError, match=r"workspace_bytes 0 is too small: this call needs"):
        module.decode_attention(**_native_args(inputs, out, 0))
    workspace = torch.empty(needed, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"dtype code 7"):
        module.decode_attention(**_native_args(inputs, out, needed, workspace.data_ptr(), 7))
    module.decode_attention(**_native_args(inputs, out, needed, workspace.data_ptr()))
    assert_matches_reference(out, *inputs, softmax_scale=0.125)

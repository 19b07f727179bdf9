"""prefill_attention against the plain-torch fp32 reference, and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from distserve_rt import _native
from distserve_rt.ops import prefill_attention
from distserve_rt.ops.prefill_attention import reference_prefill_attention
from tests.kernels.cuda_head_dims import skip_without_cuda_kernel
from tests.kernels.native_abi import arg_names

# Kernel and reference both accumulate in fp32; low-precision outputs differ by rounding of
# the result (and of the probabilities, which the kernel keeps in fp32 and torch does too).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
}
DTYPES = list(TOLERANCES)
MIXED_LENS = [1, 17, 70, 5, 130]  # 1 token, tile-crossing, > one 64-key tile


def narrow_tile_lens(group: int) -> list[int]:
    """Sequence lengths whose longest has exactly 64 packed (token, head) rows: CUDA fp16/bf16
    run them on 64-row M tiles (16 rows a warp), while MIXED_LENS (more than 64 rows at any
    group) take the 128-row tiles (32 rows a warp); see launch_prefill_attention."""
    return [1, 64 // group, 5, 3]


# Both M-tile routes of the CUDA tensor-core kernel, by name: group -> seq_lens.
TILE_ROUTES = {"tile128": lambda group: MIXED_LENS, "tile64": narrow_tile_lens}


def cu_seqlens_of(seq_lens: list[int], device: torch.device) -> torch.Tensor:
    bounds = [0]
    for n in seq_lens:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def random_qkv(seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, generator):
    """query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads, head_dim]."""
    num_tokens = sum(seq_lens)
    shapes = [(num_tokens, num_heads, head_dim)] + [(num_tokens, num_kv_heads, head_dim)] * 2
    return [torch.randn(s, generator=generator).to(dtype=dtype, device=device) for s in shapes]


def paged_prefix(prefix_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, device, gen):
    """A random 2-layer pool (layer 1 is used, so kv_block_stride != one layer's block) whose
    blocks are handed out in a shuffled order; unused block_table entries are -1.
    Returns kv_cache, block_table [batch, max_blocks_per_seq], prefix_lens, slot_mapping."""
    blocks_needed = [
        math.ceil((p + n) / block_size) for p, n in zip(prefix_lens, seq_lens, strict=True)
    ]
    num_blocks = sum(blocks_needed) + 3  # spare blocks that must stay untouched
    pool = torch.randn(num_blocks, 2, 2, num_kv_heads, block_size, head_dim, generator=gen)
    kv_cache = pool.to(dtype=dtype, device=device)[:, 1]
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.full((len(seq_lens), max(blocks_needed)), -1, dtype=torch.int32)
    slots = []
    for i, (p, n) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        row = [order.pop() for _ in range(blocks_needed[i])]
        block_table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        slots += [row[pos // block_size] * block_size + pos % block_size for pos in range(p, p + n)]
    return (
        kv_cache,
        block_table.to(device),
        torch.tensor(prefix_lens, dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.int64, device=device),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[expected.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("route", list(TILE_ROUTES))
def test_matches_reference(device, generator, dtype, head_dim, group, route):
    skip_without_cuda_kernel(device, head_dim)
    num_kv_heads = 2
    seq_lens = TILE_ROUTES[route](group)
    q, k, v = random_qkv(
        seq_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, device, generator
    )
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    out = prefill_attention(q, k, v, cu_seqlens)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))


@pytest.mark.parametrize(
    ("group", "num_kv_heads", "head_dim"),
    [(3, 2, 32), (100, 1, 16), (5, 3, 256)],
    ids=["group3", "group100", "head_dim256"],
)
def test_uneven_groups_and_head_dims(device, generator, group, num_kv_heads, head_dim):
    """Groups that do not divide the 64-row tile (padding rows), groups wider than one
    64-row score chunk, and the largest head_dim."""
    skip_without_cuda_kernel(device, head_dim)
    q, k, v = random_qkv(
        MIXED_LENS, num_kv_heads * group, num_kv_heads, head_dim, torch.float32, device, generator
    )
    cu_seqlens = cu_seqlens_of(MIXED_LENS, device)
    out = prefill_attention(q, k, v, cu_seqlens)
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))


@pytest.mark.parametrize("dtype", DTYPES)
# 12: not a power of two, the CUDA kernels' division path beside the engine's shift path.
@pytest.mark.parametrize("block_size", [8, 12, 16, 32])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("write_kv", [False, True], ids=["read_only", "slot_mapping"])
def test_paged_prefix_matches_reference(device, generator, dtype, block_size, group, write_kv):
    prefix_lens, seq_lens = [0, 5, 70, 17, 64], [3, 1, 30, 64, 9]
    num_kv_heads, head_dim = 2, 64
    q, k, v = random_qkv(
        seq_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, device, generator
    )
    kv_cache, block_table, prefix, slots = paged_prefix(
        prefix_lens, seq_lens, num_kv_heads, head_dim, block_size, dtype, device, generator
    )
    expected_cache = kv_cache.clone()
    cache_args = {"kv_cache": kv_cache, "block_table": block_table, "prefix_lens": prefix}
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    slot_mapping = slots if write_kv else None
    out = prefill_attention(q, k, v, cu_seqlens, slot_mapping=slot_mapping, **cache_args)
    expected_args = {**cache_args, "kv_cache": expected_cache, "slot_mapping": slot_mapping}
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens, **expected_args))
    # Copies of the input rows: the pool must match bit for bit, untouched blocks included.
    assert torch.equal(kv_cache, expected_cache)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_mapping_writes_new_kv_and_skips_padding(device, generator, dtype):
    seq_lens, num_kv_heads, head_dim, block_size = [4, 9], 2, 64, 8
    q, k, v = random_qkv(seq_lens, 4, num_kv_heads, head_dim, dtype, device, generator)
    kv_cache = torch.randn(6, 2, num_kv_heads, block_size, head_dim, generator=generator)
    kv_cache = kv_cache.to(dtype=dtype, device=device)
    before = kv_cache.clone()
    slots = [3, -1, 40, 41, 8, 9, 10, -1, 47, 0, 1, 2, 16]
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    out = prefill_attention(q, k, v, cu_seqlens, kv_cache=kv_cache, slot_mapping=slot_mapping)
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))
    expected = before.clone()
    for token, slot in enumerate(slots):
        if slot >= 0:
            expected[slot // block_size, 0, :, slot % block_size] = k[token]
            expected[slot // block_size, 1, :, slot % block_size] = v[token]
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_softmax_scale(device, generator, dtype):
    q, k, v = random_qkv([33, 7], 8, 2, 64, dtype, device, generator)
    cu_seqlens = cu_seqlens_of([33, 7], device)
    out = prefill_attention(q, k, v, cu_seqlens, softmax_scale=0.37)
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens, softmax_scale=0.37))
    default = prefill_attention(q, k, v, cu_seqlens)
    assert not torch.allclose(out.float(), default.float(), **TOLERANCES[dtype])


def test_out_argument_strided_is_filled_and_returned(device, generator):
    seq_lens = [20, 45]
    q, k, v = random_qkv(seq_lens, 8, 2, 128, torch.float32, device, generator)
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    buffer = torch.full((sum(seq_lens), 3, 8, 128), float("nan"), device=device)
    out = buffer[:, 1]  # token stride 3 * 8 * 128, heads x dim contiguous
    result = prefill_attention(q, k, v, cu_seqlens, out=out)
    assert result is out
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))
    assert buffer[:, 0].isnan().all() and buffer[:, 2].isnan().all()  # neighbours untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_key_value_sliced_from_packed_qkv(device, generator, dtype):
    seq_lens, num_heads, num_kv_heads, head_dim = [12, 50], 8, 2, 64
    num_tokens = sum(seq_lens)
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(widths), generator=generator).to(dtype=dtype, device=device)
    q, k, v = (
        part.view(num_tokens, -1, head_dim) for part in qkv.split(widths, dim=1)
    )  # non-contiguous: token stride = sum(widths)
    assert not q.is_contiguous()
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    out = prefill_attention(q, k, v, cu_seqlens)
    expected = reference_prefill_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens
    )
    assert_close(out, expected)


def test_single_token_and_empty_sequences(device, generator):
    seq_lens = [1, 0, 1, 1, 0]
    q, k, v = random_qkv(seq_lens, 4, 1, 64, torch.float32, device, generator)
    cu_seqlens = cu_seqlens_of(seq_lens, device)
    out = prefill_attention(q, k, v, cu_seqlens)
    # One visible key: the output is that token's value row, repeated over the group (MQA).
    assert_close(out, v.expand(-1, 4, -1))
    assert_close(out, reference_prefill_attention(q, k, v, cu_seqlens))


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_equals_one_pass(device, generator, dtype):
    """A sequence prefilled in chunks (each writes its K/V, the next reads them as its
    prefix) gives the one-pass result: the path chunked prefill schedulers rely on."""
    chunks, num_kv_heads, head_dim, block_size = [37, 64, 1, 48], 2, 64, 16
    q, k, v = random_qkv([sum(chunks)], 8, num_kv_heads, head_dim, dtype, device, generator)
    kv_cache, block_table, _, slots = paged_prefix(
        [0], [sum(chunks)], num_kv_heads, head_dim, block_size, dtype, device, generator
    )
    outs, start = [], 0
    for n in chunks:
        rows = slice(start, start + n)
        outs.append(
            prefill_attention(
                q[rows],
                k[rows],
                v[rows],
                cu_seqlens_of([n], device),
                kv_cache=kv_cache,
                block_table=block_table,
                slot_mapping=slots[rows],
                prefix_lens=torch.tensor([start], dtype=torch.int32, device=device),
            )
        )
        start += n
    one_pass = prefill_attention(q, k, v, cu_seqlens_of([sum(chunks)], device))
    assert_close(torch.cat(outs), one_pass)


def test_result_does_not_depend_on_thread_count(generator):
    seq_lens = [100, 3, 64]
    q, k, v = random_qkv(seq_lens, 8, 2, 128, torch.bfloat16, "cpu", generator)
    cu_seqlens = cu_seqlens_of(seq_lens, "cpu")
    threads = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        single = prefill_attention(q, k, v, cu_seqlens)
        _native.set_num_threads(2)
        multi = prefill_attention(q, k, v, cu_seqlens)
    finally:
        _native.set_num_threads(threads)
    assert torch.equal(single, multi)


# ---- argument checks ---------------------------------------------------------------------


def valid_args(device, generator) -> dict:
    """A correct chunked-prefill call: 2 sequences, 4 heads / 2 kv heads, head_dim 64."""
    seq_lens, prefix_lens = [3, 5], [4, 0]
    q, k, v = random_qkv(seq_lens, 4, 2, 64, torch.float32, device, generator)
    kv_cache, block_table, prefix, slots = paged_prefix(
        prefix_lens, seq_lens, 2, 64, 8, torch.float32, device, generator
    )
    return {
        "query": q,
        "key": k,
        "value": v,
        "cu_seqlens": cu_seqlens_of(seq_lens, device),
        "kv_cache": kv_cache,
        "block_table": block_table,
        "prefix_lens": prefix,
        "slot_mapping": slots,
    }


def call(args: dict) -> torch.Tensor:
    args = dict(args)
    qkv = [args.pop(name) for name in ("query", "key", "value", "cu_seqlens")]
    return prefill_attention(*qkv, **args)


def replace(name, fn):
    return lambda a: {**a, name: fn(a[name])}


def set_index(tensor: torch.Tensor, index, value) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD_ARGS = {
    "query_int": (replace("query", lambda t: t.int()), r"query has dtype torch.int32"),
    "key_dtype": (replace("key", lambda t: t.half()), r"key has dtype torch.float16; allowed: f"),
    "cache_dtype": (replace("kv_cache", lambda t: t.half()), r"kv_cache has dtype"),
    "out_dtype": (lambda a: {**a, "out": a["query"].bfloat16()}, r"out has dtype"),
    "cu_seqlens_int64": (replace("cu_seqlens", lambda t: t.long()), r"cu_seqlens has dtype"),
    "block_table_int64": (replace("block_table", lambda t: t.long()), r"block_table has dtype"),
    "prefix_lens_int64": (replace("prefix_lens", lambda t: t.long()), r"prefix_lens has dtype"),
    "slot_mapping_int32": (replace("slot_mapping", lambda t: t.int()), r"slot_mapping has dty"),
    "query_not_tensor": (replace("query", lambda t: t.tolist()), r"query must be a torch.Tens"),
    "query_2d": (replace("query", lambda t: t.flatten(1)), r"query must have 3 dimensions"),
    "key_num_tokens": (replace("key", lambda t: t[:-1]), r"key has shape .*dimension 0 must"),
    "key_head_dim": (replace("key", lambda t: t[..., :32]), r"key has shape .*dimension 2 must"),
    "value_heads": (replace("value", lambda t: t[:, :1]), r"value has shape .*dimension 1 must"),
    "heads_not_multiple": (
        lambda a: {**a, "key": a["key"][:, [0, 1, 1]], "value": a["value"][:, [0, 1, 1]]},
        r"num_heads \(4\) must be a positive multiple of num_kv_heads \(3\)",
    ),
    "head_dim_too_large": (
        lambda a: {
            "query": a["query"].repeat(1, 1, 5),
            "key": a["key"].repeat(1, 1, 5),
            "value": a["value"].repeat(1, 1, 5),
            "cu_seqlens": a["cu_seqlens"],
        },
        r"query has head_dim 320; supported: 1..256",
    ),
    "query_inner_stride": (
        replace("query", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
        r"query must be contiguous in dimensions 1..",
    ),
    "key_inner_stride": (
        replace("key", lambda t: t.repeat_interleave(2, dim=2)[..., ::2]),
        r"key must be contiguous in dimensions 1..",
    ),
    "out_rows_overlap": (
        lambda a: {**a, "out": torch.empty_like(a["query"][:1]).expand_as(a["query"])},
        r"out has token stride 0 < num_heads \* head_dim = 256",
    ),
    "out_shape": (lambda a: {**a, "out": a["query"][:, :2]}, r"out has shape \(8, 2, 64\)"),
    "cache_not_kv": (replace("kv_cache", lambda t: t[:, :1]), r"kv_cache has shape .*dimension 1"),
    "cache_heads": (replace("kv_cache", lambda t: t[:, :, :1]), r"kv_cache has shape .*dimensio"),
    "block_table_rows": (replace("block_table", lambda t: t[:1]), r"block_table has shape \(1,"),
    "prefix_lens_len": (replace("prefix_lens", lambda t: t[:1]), r"prefix_lens has shape \(1,\)"),
    "slot_mapping_len": (replace("slot_mapping", lambda t: t[:-1]), r"slot_mapping has shape"),
    "table_without_prefix_lens": (
        lambda a: {**a, "prefix_lens": None},
        r"block_table and prefix_lens must be given together",
    ),
    "no_kv_cache": (lambda a: {**a, "kv_cache": None}, r"block_table was given without kv_cache"),
    "scale_negative": (lambda a: {**a, "softmax_scale": -1.0}, r"softmax_scale must be a posit"),
    "max_seqlen_negative": (lambda a: {**a, "max_seqlen": -1}, r"max_seqlen must be an int >= 0"),
    # True is an int to Python; as a length it is a bug (decode refuses it the same way).
    "max_seqlen_bool": (lambda a: {**a, "max_seqlen": True}, r"max_seqlen must be an int >= 0"),
    "key_wrong_device": (replace("key", lambda t: t.to("meta")), r"key is on meta, it must be on"),
    "cache_wrong_device": (replace("kv_cache", lambda t: t.to("meta")), r"kv_cache is on meta"),
    "query_wrong_device": (
        lambda a: {name: t.to("meta") for name, t in a.items()},
        r"device meta is not supported",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise_value_error(device, generator, case):
    mutate, message = BAD_ARGS[case]
    with pytest.raises(ValueError, match=message):
        call(mutate(valid_args(device, generator)))


# Values inside index tensors: checked by the CPU launcher (the CUDA kernels skip bad ids).
BAD_VALUES = {
    "cu_seqlens_start": (replace("cu_seqlens", lambda t: t + 1), r"cu_seqlens\[0\] must be 0"),
    "cu_seqlens_not_monotone": (
        lambda a: {**a, "cu_seqlens": torch.tensor([0, 9, 8], dtype=torch.int32), "max_seqlen": 9},
        r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\] = 9 > cu_seqlens\[2\] = 8",
    ),
    "cu_seqlens_end": (
        replace("cu_seqlens", lambda t: set_index(t, 2, 7)),
        r"cu_seqlens\[batch\] = 7 must equal num_tokens = 8",
    ),
    "max_seqlen_too_small": (
        lambda a: {**a, "max_seqlen": 4},
        r"sequence 1 has 5 tokens, more than max_seqlen_q = 4",
    ),
    "block_out_of_range": (
        replace("block_table", lambda t: set_index(t, (0, 0), 99)),
        r"block_table\[0\]\[0\] = 99 is out of range \[0, num_blocks = \d+\)",
    ),
    "block_negative": (
        replace("block_table", lambda t: set_index(t, (0, 0), -1)),
        r"block_table\[0\]\[0\] = -1 is out of range",
    ),
    "prefix_negative": (
        replace("prefix_lens", lambda t: set_index(t, 0, -1)),
        r"prefix_lens\[0\] must be >= 0, got -1",
    ),
    "prefix_past_block_table": (
        replace("prefix_lens", lambda t: set_index(t, 1, 12)),
        r"sequence 1: prefix_lens\[1\] \+ new tokens = 12 \+ 5 exceeds max_blocks_per_seq",
    ),
    "slot_out_of_range": (
        replace("slot_mapping", lambda t: set_index(t, 2, 10_000)),
        r"slot_mapping\[2\] = 10000 is out of range",
    ),
    # Two tokens in one slot: the fused write would race (same rule as write_kv).
    "slot_duplicate": (
        replace("slot_mapping", lambda t: set_index(t, 3, int(t[1]))),
        r"slot_mapping\[1\] and slot_mapping\[3\] are both",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_index_values_raise_before_any_write(generator, case):
    mutate, message = BAD_VALUES[case]
    args = mutate(valid_args(torch.device("cpu"), generator))
    cache_before = args["kv_cache"].clone()
    with pytest.raises(ValueError, match=message):
        call(args)
    assert torch.equal(args["kv_cache"], cache_before)


def test_native_rejects_unknown_dtype_code():
    module = _native.cpu_module()
    args = dict.fromkeys(arg_names(module.prefill_attention), 0)
    args["dtype"] = 7
    with pytest.raises(ValueError, match=r"dtype code 7 is not one of"):
        module.prefill_attention(**args)

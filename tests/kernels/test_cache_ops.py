"""write_kv and copy_blocks against their plain-torch references.

Both ops only move bytes, so every comparison is exact (torch.equal, tolerance 0) for every
dtype; inputs are fresh random values, and pools start random (never zeros) so a slot or
block the op must not touch is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve_rt import _native, ops
from distserve_rt.core.kv_cache import KVCacheSpec, layer_view
from distserve_rt.ops.cache import copy_blocks, reference_copy_blocks, reference_write_kv, write_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(shape, dtype, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype).to(device)


def random_pool(spec: KVCacheSpec, generator, device) -> torch.Tensor:
    return randn(spec.shape, spec.dtype, generator, device)


def make_slot_mapping(block_size, num_blocks, seq_lens, start_positions, num_padding, generator):
    """Slots as the scheduler makes them: each sequence gets random distinct blocks and its
    tokens sit at positions start..start+seq_len-1, so runs cross block boundaries; -1
    padding is inserted at random places."""
    blocks = torch.randperm(num_blocks, generator=generator).tolist()
    slots = []
    for seq_len, start in zip(seq_lens, start_positions, strict=True):
        block_table = [blocks.pop() for _ in range(math.ceil((start + seq_len) / block_size))]
        for pos in range(start, start + seq_len):
            slots.append(block_table[pos // block_size] * block_size + pos % block_size)
    for _ in range(num_padding):
        slots.insert(int(torch.randint(len(slots) + 1, (1,), generator=generator)), -1)
    return torch.tensor(slots, dtype=torch.int64)


@pytest.fixture
def restore_num_threads():
    num_threads = ops.get_num_threads()
    yield
    ops.set_num_threads(num_threads)


# ---- write_kv -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference(device, generator, dtype, block_size, head_dim, num_kv_heads):
    spec = KVCacheSpec(9, 1, num_kv_heads, head_dim, block_size, dtype)
    seq_lens, starts = [2 * block_size + 5, 7, 1], [block_size - 3, 0, 5]
    slot_mapping = make_slot_mapping(block_size, 9, seq_lens, starts, 3, generator)
    num_tokens = slot_mapping.numel()
    key = randn((num_tokens, num_kv_heads, head_dim), dtype, generator, device)
    value = randn((num_tokens, num_kv_heads, head_dim), dtype, generator, device)
    kv_cache = layer_view(random_pool(spec, generator, device), 0)
    expected = kv_cache.clone()
    reference_write_kv(key, value, expected, slot_mapping)
    write_kv(key, value, kv_cache, slot_mapping.to(device))
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("num_kv_heads", [1, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_from_packed_qkv(device, generator, dtype, num_kv_heads):
    """key/value as token slices of one qkv projection: token stride (H + 2KV) * D."""
    num_heads, head_dim, block_size, num_tokens = 2 * num_kv_heads, 64, 16, 45
    qkv = randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), dtype, generator, device)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    key = qkv[:, q_end:k_end].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, k_end:].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous() and not value.is_contiguous()
    slot_mapping = make_slot_mapping(block_size, 6, [num_tokens], [9], 0, generator)
    kv_cache = layer_view(
        random_pool(KVCacheSpec(6, 1, num_kv_heads, 64, 16, dtype), generator, device), 0
    )
    expected = kv_cache.clone()
    reference_write_kv(key, value, expected, slot_mapping)
    write_kv(key, value, kv_cache, slot_mapping.to(device))
    assert torch.equal(kv_cache, expected)


def test_write_kv_into_layer_view_touches_only_that_layer(device, generator):
    spec = KVCacheSpec(5, 3, 4, 64, 8, torch.bfloat16)
    pool = random_pool(spec, generator, device)
    before = pool.clone()
    slot_mapping = make_slot_mapping(8, 5, [13, 4], [2, 0], 2, generator)
    key = randn((slot_mapping.numel(), 4, 64), spec.dtype, generator, device)
    value = randn((slot_mapping.numel(), 4, 64), spec.dtype, generator, device)
    write_kv(key, value, layer_view(pool, 1), slot_mapping.to(device))
    expected = layer_view(before, 1).clone()
    reference_write_kv(key, value, expected, slot_mapping)
    assert torch.equal(layer_view(pool, 1), expected)
    assert torch.equal(pool[:, 0], before[:, 0]) and torch.equal(pool[:, 2], before[:, 2])


@pytest.mark.parametrize("num_threads", [1, 2])
def test_write_kv_many_tokens_threaded(generator, restore_num_threads, num_threads):
    """4 MiB of K/V: large enough for the OpenMP path; same bytes with 1 or 2 threads."""
    ops.set_num_threads(num_threads)
    spec = KVCacheSpec(40, 1, 8, 128, 16, torch.float32)
    slot_mapping = torch.randperm(spec.num_slots, generator=generator)[:512]
    slot_mapping[::7] = -1
    key = randn((512, 8, 128), spec.dtype, generator, "cpu")
    value = randn((512, 8, 128), spec.dtype, generator, "cpu")
    kv_cache = layer_view(random_pool(spec, generator, "cpu"), 0)
    expected = kv_cache.clone()
    reference_write_kv(key, value, expected, slot_mapping)
    write_kv(key, value, kv_cache, slot_mapping)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("slots", [[-1, -1, -1], [-5, -1, -(2**40)], []])
def test_write_kv_padding_only_is_a_no_op(device, generator, slots):
    kv_cache = layer_view(random_pool(KVCacheSpec(2, 1, 2, 64, 8), generator, device), 0)
    before = kv_cache.clone()
    key = randn((len(slots), 2, 64), torch.float32, generator, device)
    write_kv(key, key.clone(), kv_cache, torch.tensor(slots, dtype=torch.int64, device=device))
    assert torch.equal(kv_cache, before)


def _write_kv_args(generator):
    """Valid arguments (cpu fp32, 2 kv heads, head_dim 64, 3 blocks of 8) for bad-input tests."""
    kv_cache = layer_view(random_pool(KVCacheSpec(3, 1, 2, 64, 8), generator, "cpu"), 0)
    return {
        "key": randn((4, 2, 64), torch.float32, generator, "cpu"),
        "value": randn((4, 2, 64), torch.float32, generator, "cpu"),
        "kv_cache": kv_cache,
        "slot_mapping": torch.tensor([3, 9, -1, 23], dtype=torch.int64),
    }


WRITE_KV_BAD_INPUTS = {
    "key not a tensor": ("key", lambda a: a["key"].tolist(), "key must be a torch.Tensor"),
    "key int dtype": ("key", lambda a: a["key"].int(), "key has dtype torch.int32"),
    "key 2-D": ("key", lambda a: a["key"].flatten(1), "key must have 3 dimensions"),
    "value shape": ("value", lambda a: a["value"][:, :1], r"value has shape \(4, 1, 64\)"),
    "value dtype": ("value", lambda a: a["value"].half(), "value has dtype torch.float16"),
    "value device": ("value", lambda a: a["value"].to("meta"), "value is on meta"),
    "cache dtype": ("kv_cache", lambda a: a["kv_cache"].half(), "kv_cache has dtype"),
    "cache 4-D": ("kv_cache", lambda a: a["kv_cache"][:, 0], "kv_cache must have 5 dim"),
    "cache not K,V": ("kv_cache", lambda a: a["kv_cache"][:, :1], "dimension 1 must be 2"),
    "cache heads": ("kv_cache", lambda a: a["kv_cache"][:, :, :1], "dimension 2 must be 2"),
    "cache head_dim": ("kv_cache", lambda a: a["kv_cache"][..., :32], "dimension 4 must be 64"),
    "cache inner strides": (
        "kv_cache",
        lambda a: a["kv_cache"].transpose(3, 4).contiguous().transpose(3, 4),
        "kv_cache must be contiguous in dimensions 1",
    ),
    "key inner strides": (
        "key",
        lambda a: torch.cat([a["key"], a["key"]], dim=2)[:, :, ::2],
        "key must be contiguous in dimensions 1",
    ),
    "slots int32": ("slot_mapping", lambda a: a["slot_mapping"].int(), "slot_mapping has dtype"),
    "slots length": ("slot_mapping", lambda a: a["slot_mapping"][:3], "dimension 0 must be 4"),
    "slots strided": (
        "slot_mapping",
        lambda a: torch.tensor([3, 0, 9, 0, -1, 0, 23, 0])[::2],
        "slot_mapping must be contiguous",
    ),
    "slots device": ("slot_mapping", lambda a: a["slot_mapping"].to("meta"), "is on meta"),
    "slot too large": (
        "slot_mapping",
        lambda a: torch.tensor([3, 24, -1, 99]),
        r"slot_mapping\[1\] = 24 is out of range: slots must be < num_blocks \* block_size = 24",
    ),
    "duplicate slot": (
        "slot_mapping",
        lambda a: torch.tensor([9, 3, -1, 9]),
        r"slot_mapping\[0\] and slot_mapping\[3\] are both 9",
    ),
}


@pytest.mark.parametrize("case", WRITE_KV_BAD_INPUTS, ids=list(WRITE_KV_BAD_INPUTS))
def test_write_kv_rejects_bad_input(generator, case):
    name, make_bad, message = WRITE_KV_BAD_INPUTS[case]
    args = _write_kv_args(generator)
    kv_cache, before = args["kv_cache"], args["kv_cache"].clone()
    args[name] = make_bad(args)
    with pytest.raises(ValueError, match=message):
        write_kv(**args)
    assert torch.equal(kv_cache, before), "a rejected call must not write"


def _native_write_kv_args(generator) -> tuple[dict, dict]:
    """(native arguments, the tensors behind their pointers: keep them alive)."""
    args = _write_kv_args(generator)
    native_args = {
        "key": args["key"].data_ptr(),
        "value": args["value"].data_ptr(),
        "kv_cache": args["kv_cache"].data_ptr(),
        "slot_mapping": args["slot_mapping"].data_ptr(),
        "num_tokens": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "key_token_stride": 128,
        "value_token_stride": 128,
        "num_blocks": 3,
        "block_size": 8,
        "kv_block_stride": 2 * 2 * 8 * 64,
        "dtype": 0,
    }
    return native_args, args


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("dtype", 3, "dtype code 3"),
        ("num_tokens", -1, "num_tokens must be >= 0"),
        ("num_kv_heads", 0, "num_kv_heads must be >= 1"),
        ("head_dim", 0, "head_dim must be >= 1"),
        ("block_size", 0, "block_size must be >= 1"),
        ("num_blocks", -1, "num_blocks must be >= 0"),
        ("key_token_stride", 127, r"key_token_stride \(127\) must be >= .* \(128\)"),
        ("value_token_stride", 64, r"value_token_stride \(64\) must be >= .* \(128\)"),
        ("kv_block_stride", 2047, r"kv_block_stride \(2047\) must be >= .* \(2048\)"),
        ("key", 0, "must be non-null pointers"),
    ],
)
def test_native_write_kv_launcher_checks(generator, field, bad, message):
    args, tensors = _native_write_kv_args(generator)
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        _native.cpu_module().write_kv(**args)
    del tensors


def test_native_write_kv_baseline_args_are_valid(generator):
    """The arguments the launcher-check cases start from are accepted as they are."""
    args, tensors = _native_write_kv_args(generator)
    expected = tensors["kv_cache"].clone()
    reference_write_kv(tensors["key"], tensors["value"], expected, tensors["slot_mapping"])
    _native.cpu_module().write_kv(**args)
    assert torch.equal(tensors["kv_cache"], expected)


# ---- copy_blocks --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_between_pools(device, generator, dtype):
    src = random_pool(KVCacheSpec(12, 2, 4, 64, 16, dtype), generator, device)
    dst = random_pool(KVCacheSpec(7, 2, 4, 64, 16, dtype), generator, device)
    # Distinct dst blocks; src blocks may repeat (one block fanned out is allowed).
    mapping = torch.stack([torch.tensor([11, 0, 4, 4, 9]), torch.tensor([6, 0, 2, 5, 1])], dim=1)
    expected = dst.clone()
    reference_copy_blocks(src, expected, mapping)
    src_before = src.clone()
    copy_blocks(src, dst, mapping.to(device))
    assert torch.equal(dst, expected)
    assert torch.equal(src, src_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_within_one_pool(device, generator, dtype):
    pool = random_pool(KVCacheSpec(10, 3, 2, 64, 8, dtype), generator, device)
    mapping = [[0, 5], [1, 9], [0, 2], [7, 3]]
    expected = pool.clone()
    reference_copy_blocks(expected.clone(), expected, mapping)
    copy_blocks(pool, pool, mapping)
    assert torch.equal(pool, expected)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    ("num_blocks", "block_shape", "num_pairs"),
    [
        (700, (2, 2, 8, 64), 600),  # many small blocks (8 KiB): split over pairs
        (8, (3, 2, 4, 16, 681), 5),  # few large blocks (~1 MiB, not a multiple of a chunk)
    ],
)
def test_copy_blocks_threaded(
    generator, restore_num_threads, num_threads, num_blocks, block_shape, num_pairs
):
    ops.set_num_threads(num_threads)
    src = randn((num_blocks, *block_shape), torch.float32, generator, "cpu")
    dst = randn((num_blocks, *block_shape), torch.float32, generator, "cpu")
    src_ids = torch.randint(num_blocks, (num_pairs,), generator=generator)
    dst_ids = torch.randperm(num_blocks, generator=generator)[:num_pairs]
    mapping = torch.stack([src_ids, dst_ids], dim=1)
    expected = dst.clone()
    reference_copy_blocks(src, expected, mapping)
    copy_blocks(src, dst, mapping)
    assert torch.equal(dst, expected)


def test_copy_blocks_strided_pools_sharing_memory(device, generator):
    """Pools whose blocks are interleaved in one allocation (block stride > block bytes):
    same ids in src and dst do not overlap in memory, so reading and writing them is fine."""
    storage = randn((6, 2, 3, 40), torch.bfloat16, generator, device)
    src, dst = storage[:, 0], storage[:, 1]
    expected = storage.clone()
    reference_copy_blocks(expected[:, 0].clone(), expected[:, 1], [[0, 0], [5, 1], [2, 3]])
    copy_blocks(src, dst, [[0, 0], [5, 1], [2, 3]])
    assert torch.equal(storage, expected)


def test_copy_blocks_single_block_pool_with_odd_stride(device, generator):
    """A one-block pool may report any dim-0 stride (here 1); only its block size counts."""
    block = randn((4, 5), torch.float32, generator, device)
    src = block.as_strided((1, 4, 5), (1, 5, 1))
    dst = randn((3, 4, 5), torch.float32, generator, device)
    copy_blocks(src, dst, [[0, 2]])
    assert torch.equal(dst[2], block)


@pytest.mark.parametrize("mapping", [[], (), torch.empty(0, 2, dtype=torch.int64)])
def test_copy_blocks_empty_mapping_is_a_no_op(device, generator, mapping):
    pool = random_pool(KVCacheSpec(3, 1, 2, 64, 8), generator, device)
    before = pool.clone()
    copy_blocks(pool, pool, mapping.to(device) if isinstance(mapping, torch.Tensor) else mapping)
    assert torch.equal(pool, before)


def _copy_args(generator):
    src = random_pool(KVCacheSpec(6, 2, 2, 64, 8), generator, "cpu")
    dst = random_pool(KVCacheSpec(4, 2, 2, 64, 8), generator, "cpu")
    return {"src": src, "dst": dst, "block_mapping": torch.tensor([[0, 1], [5, 3]])}


def _one_pool(args, mapping):
    return {"src": args["src"], "dst": args["src"], "block_mapping": torch.tensor(mapping)}


COPY_BLOCKS_BAD_INPUTS = {
    "src id too large": (
        lambda a: {**a, "block_mapping": torch.tensor([[0, 1], [6, 3]])},
        r"block_mapping\[1\] = \(6, 3\): src block 6 is out of range \[0, 6\)",
    ),
    "src id negative": (
        lambda a: {**a, "block_mapping": torch.tensor([[-1, 1]])},
        r"block_mapping\[0\] = \(-1, 1\): src block -1 is out of range",
    ),
    "dst id too large": (
        lambda a: {**a, "block_mapping": torch.tensor([[0, 1], [2, 2], [3, 4]])},
        r"block_mapping\[2\] = \(3, 4\): dst block 4 is out of range \[0, 4\)",
    ),
    "duplicate dst": (
        lambda a: {**a, "block_mapping": torch.tensor([[0, 3], [1, 0], [2, 3]])},
        r"block_mapping\[0\] and block_mapping\[2\] both write dst block 3",
    ),
    "read of a written block": (
        lambda a: _one_pool(a, [[0, 1], [1, 2]]),
        r"block_mapping\[1\] reads src block 1 while block_mapping\[0\] writes dst block 1",
    ),
    "block copied onto itself": (
        lambda a: _one_pool(a, [[4, 4]]),
        r"block_mapping\[0\] reads src block 4 while block_mapping\[0\] writes dst block 4",
    ),
    "overlap through views": (
        lambda a: {"src": a["src"][:4], "dst": a["src"][2:], "block_mapping": [[3, 0], [0, 1]]},
        # src block 3 is pool[3], which dst block 1 (pool[2:][1]) also is
        r"block_mapping\[0\] reads src block 3 while block_mapping\[1\] writes dst block 1",
    ),
    "block shapes": (lambda a: {**a, "dst": a["dst"][:, :1]}, "dst blocks have shape"),
    "dtypes": (lambda a: {**a, "dst": a["dst"].half()}, "dst has dtype torch.float16"),
    "devices": (lambda a: {**a, "dst": a["dst"].to("meta")}, "dst is on meta and src on cpu"),
    "src not a tensor": (lambda a: {**a, "src": a["src"].tolist()}, "src must be a torch.Tensor"),
    "src 0-dim": (lambda a: {**a, "src": torch.tensor(1.0)}, "must have a block dimension"),
    "block not contiguous": (
        lambda a: {**a, "src": a["src"].transpose(1, 3).contiguous().transpose(1, 3)},
        "src must be contiguous in dimensions 1",
    ),
    "mapping int32": (
        lambda a: {**a, "block_mapping": a["block_mapping"].int()},
        "block_mapping has dtype torch.int32",
    ),
    "mapping floats": (
        lambda a: {**a, "block_mapping": [[0.0, 1.0]]},
        "block_mapping has dtype torch.float32",
    ),
    "mapping 1-D": (
        lambda a: {**a, "block_mapping": torch.tensor([0, 1])},
        r"block_mapping must have shape \[num_pairs, 2\]",
    ),
    "mapping 3 columns": (
        lambda a: {**a, "block_mapping": [[0, 1, 2]]},
        r"block_mapping must have shape \[num_pairs, 2\].*\(1, 3\)",
    ),
    "mapping strided": (
        lambda a: {**a, "block_mapping": torch.tensor([[0, 5], [1, 3]]).t()},
        "block_mapping must be contiguous",
    ),
    "mapping device": (
        lambda a: {**a, "block_mapping": a["block_mapping"].to("meta")},
        "block_mapping is on meta",
    ),
    "mapping type": (lambda a: {**a, "block_mapping": 3}, "block_mapping must be an int64"),
}


@pytest.mark.parametrize("case", COPY_BLOCKS_BAD_INPUTS, ids=list(COPY_BLOCKS_BAD_INPUTS))
def test_copy_blocks_rejects_bad_input(generator, case):
    make_bad, message = COPY_BLOCKS_BAD_INPUTS[case]
    args = _copy_args(generator)
    before = {name: args[name].clone() for name in ("src", "dst")}
    with pytest.raises(ValueError, match=message):
        copy_blocks(**make_bad(args))
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), f"a rejected call must not write {name}"


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("num_pairs", -1, "num_pairs must be >= 0"),
        ("src_num_blocks", -1, "src_num_blocks must be >= 0"),
        ("dst_num_blocks", -1, "dst_num_blocks must be >= 0"),
        ("block_bytes", 0, "block_bytes must be >= 1"),
        ("src_block_stride_bytes", 4095, r"src_block_stride_bytes \(4095\) must be >= block"),
        ("dst_block_stride_bytes", 100, r"dst_block_stride_bytes \(100\) must be >= block"),
        ("block_mapping", 0, "must be non-null pointers"),
        (None, None, None),  # the baseline arguments are valid
    ],
)
def test_native_copy_blocks_launcher_checks(generator, field, bad, message):
    src = randn((4, 1024), torch.float32, generator, "cpu")
    dst = randn((3, 1024), torch.float32, generator, "cpu")
    mapping = torch.tensor([[3, 0], [1, 2]])
    args = {
        "src": src.data_ptr(),
        "dst": dst.data_ptr(),
        "block_mapping": mapping.data_ptr(),
        "num_pairs": 2,
        "src_num_blocks": 4,
        "dst_num_blocks": 3,
        "src_block_stride_bytes": 4096,
        "dst_block_stride_bytes": 4096,
        "block_bytes": 4096,
    }
    if field is None:
        _native.cpu_module().copy_blocks(**args)
        assert torch.equal(dst[0], src[3]) and torch.equal(dst[2], src[1])
        return
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        _native.cpu_module().copy_blocks(**args)


@st.composite
def pools_and_mappings(draw):
    """A valid mapping for one pool or two, then (half the time) one arbitrary extra pair
    that may break it: out-of-range ids, a dst written twice, a block read and written."""
    src_num_blocks = draw(st.integers(1, 16))
    same_pool = draw(st.booleans())
    dst_num_blocks = src_num_blocks if same_pool else draw(st.integers(1, 16))
    dst_ids = draw(st.permutations(range(dst_num_blocks)))
    if same_pool:
        num_pairs = draw(st.integers(0, dst_num_blocks - 1))
        readable = dst_ids[num_pairs:]  # blocks not written may be read, any number of times
        src_ids = [draw(st.sampled_from(readable)) for _ in range(num_pairs)]
    else:
        num_pairs = draw(st.integers(0, dst_num_blocks))
        src_ids = draw(
            st.lists(st.integers(0, src_num_blocks - 1), min_size=num_pairs, max_size=num_pairs)
        )
    mapping = list(zip(src_ids, dst_ids[:num_pairs], strict=True))
    if draw(st.booleans()):
        extra = (draw(st.integers(-1, src_num_blocks)), draw(st.integers(-1, dst_num_blocks)))
        mapping.insert(draw(st.integers(0, len(mapping))), extra)
    return src_num_blocks, dst_num_blocks, same_pool, mapping


def mapping_is_valid(src_num_blocks, dst_num_blocks, same_pool, mapping) -> bool:
    srcs, dsts = [s for s, _ in mapping], [d for _, d in mapping]
    in_range = all(0 <= s < src_num_blocks for s in srcs) and all(
        0 <= d < dst_num_blocks for d in dsts
    )
    read_and_written = same_pool and bool(set(srcs) & set(dsts))
    return in_range and len(set(dsts)) == len(dsts) and not read_and_written


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pools_and_mappings(), seed=st.integers(0, 2**31 - 1))
def test_copy_blocks_property_matches_reference_or_rejects(case, seed):
    """Valid mappings give the reference's bytes; invalid ones raise and write nothing."""
    src_num_blocks, dst_num_blocks, same_pool, mapping = case
    generator = torch.Generator().manual_seed(seed)
    src = randn((src_num_blocks, 2, 3, 8), torch.bfloat16, generator, "cpu")
    dst = src if same_pool else randn((dst_num_blocks, 2, 3, 8), torch.bfloat16, generator, "cpu")
    expected = dst.clone()
    if not mapping_is_valid(src_num_blocks, dst_num_blocks, same_pool, mapping):
        with pytest.raises(ValueError, match="block_mapping"):
            copy_blocks(src, dst, mapping)
        assert torch.equal(dst, expected)
        return
    reference_copy_blocks(src.clone(), expected, mapping)
    copy_blocks(src, dst, mapping)
    assert torch.equal(dst, expected)

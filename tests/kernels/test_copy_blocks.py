"""copy_blocks against its plain-torch reference: bit-exact copies of random pools, and
every id, overlap and layout error rejected before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve_rt import _native, ops
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.ops.cache import check_block_mapping_on_host, copy_blocks, reference_copy_blocks
from tests.kernels.cache_helpers import (
    DTYPES,
    randn,
    random_pool,
)


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


# ---- host-side checks of mappings headed to a device -------------------------------------
# copy_blocks runs them for list/numpy mappings with CUDA pools; they are plain functions of
# the pools' layout, so CPU tensors test them here.


def _host_pools(generator):
    pool = randn((8, 4, 16), torch.float32, generator, "cpu")  # [num_blocks, ...]
    return pool, pool.clone()


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[0, 1], [8, 2]], r"block_mapping\[1\] = \[8, 2\]: src block 8 is out of range"),
        ([[0, -1]], r"dst block -1 is out of range \[0, 8\)"),
        ([[0, 3], [1, 3]], r"block_mapping\[0\] and block_mapping\[1\] both write dst block 3"),
    ],
)
def test_host_mapping_check_rejects_bad_ids(generator, pairs, message):
    src, dst = _host_pools(generator)
    mapping = torch.tensor(pairs)
    with pytest.raises(ValueError, match=message):
        check_block_mapping_on_host(mapping, src, dst, 4 * 16 * 4)


def test_host_mapping_check_rejects_read_write_overlap_in_one_pool(generator):
    pool, _ = _host_pools(generator)
    block_bytes = 4 * 16 * 4
    check_block_mapping_on_host(torch.tensor([[0, 1], [2, 3]]), pool, pool, block_bytes)
    with pytest.raises(ValueError, match=r"block_mapping\[0\] = \[0, 1\] writes memory"):
        check_block_mapping_on_host(torch.tensor([[0, 1], [1, 0]]), pool, pool, block_bytes)
    # Views of one allocation that do not overlap are fine (pool[:4] -> pool[4:]).
    check_block_mapping_on_host(torch.tensor([[0, 0], [3, 3]]), pool[:4], pool[4:], block_bytes)
    with pytest.raises(ValueError, match="writes memory that the same call reads"):
        check_block_mapping_on_host(torch.tensor([[2, 0]]), pool[:4], pool[2:], block_bytes)

"""write_kv against its plain-torch reference.

The op only moves bytes, so every comparison is exact (torch.equal, tolerance 0) for every
dtype; inputs are fresh random values and pools start random (never zeros), so slots the op
must not touch are checked too.
"""

from __future__ import annotations

import pytest
import torch

from distserve_rt import _native, ops
from distserve_rt.core.kv_cache import KVCacheSpec, layer_view
from distserve_rt.ops.cache import reference_write_kv, write_kv
from tests.kernels.cache_helpers import (
    DTYPES,
    make_slot_mapping,
    randn,
    random_pool,
)


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

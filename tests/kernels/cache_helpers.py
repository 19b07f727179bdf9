"""Shared by the cache-op tests (test_write_kv.py, test_copy_blocks.py)."""

from __future__ import annotations

import math

import torch

from distserve_rt.core.kv_cache import KVCacheSpec

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

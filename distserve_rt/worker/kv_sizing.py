"""How many KV blocks an instance gets.

CPU: a configured byte budget (`kv_cache_memory_bytes`), checked against the RAM that is
available now, so a typo of a zero fails at start-up with a message, not with the OOM killer.

GPU: ``gpu_memory_utilization * total - (weights + activation peak) - memory outside torch``,
the activation peak measured by a profile run of the largest step the scheduler may build
(`max_num_batched_tokens` tokens, no KV cache), as vLLM does. On a GPU shared with other
instances (disaggregated ``share_gpus``) the memory outside torch cannot be told apart from
theirs, so a fixed `SHARED_GPU_NON_TORCH_BYTES` stands for it and the fraction is this
process's own share.

Either way the pool is capped at what the scheduler can ever use
(``max_num_seqs * ceil(max_model_len / block_size)`` blocks): more is memory nobody reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from distserve_rt.logger import init_logger

logger = init_logger(__name__)

GiB = 1 << 30

SHARED_GPU_NON_TORCH_BYTES = 1 * GiB
"""What one process on a shared GPU is assumed to hold outside torch's allocator: its CUDA
context (~0.5 GiB on Hopper), NCCL buffers, the transfer engine's events. An estimate, not
a measurement: `torch.cuda.mem_get_info` is device-wide, and the other instances on the
GPU load and allocate at the same time."""


def available_ram_bytes() -> int:
    """RAM available to allocate now (free pages), from os.sysconf."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_useful_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks the scheduler can fill at most: every sequence at full context."""
    return max_num_seqs * -(-max_model_len // block_size)


def num_cpu_blocks(kv_cache_memory_bytes: int, block_bytes: int, max_blocks: int) -> int:
    """Blocks of `block_bytes` bytes in a budget of `kv_cache_memory_bytes`, capped at
    `max_blocks`. Raises ValueError when the budget exceeds the available RAM or holds no
    block."""
    available = available_ram_bytes()
    if kv_cache_memory_bytes > available:
        raise ValueError(
            f"kv_cache_memory_bytes={kv_cache_memory_bytes} exceeds the available RAM "
            f"({available} bytes); lower it"
        )
    num_blocks = kv_cache_memory_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={kv_cache_memory_bytes} holds no KV block "
            f"({block_bytes} bytes each); raise it"
        )
    return min(num_blocks, max_blocks)


def num_gpu_blocks(
    profile_step: Callable[[], None],
    gpu_memory_utilization: float,
    block_bytes: int,
    max_blocks: int,
    device: torch.device,
    shared: bool = False,
) -> int:
    """Blocks that fit in ``gpu_memory_utilization`` of the device after the model.

    Args:
        profile_step: runs the largest step without a KV cache (weights already loaded).
        gpu_memory_utilization: fraction of the device's total memory this instance may
            use, weights, activations and KV cache together, in (0, 1].
        block_bytes: bytes of one KV block (all of this worker's layers, K and V).
        shared: other processes' instances use this GPU: count this process's memory only
            (torch's peak plus `SHARED_GPU_NON_TORCH_BYTES`), not the device-wide usage.

    Raises ValueError when no block fits (the message gives the measured numbers).
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_step()
    torch.cuda.synchronize(device)
    torch_peak = torch.cuda.max_memory_allocated(device)  # weights + activation peak
    free, total = torch.cuda.mem_get_info(device)
    if shared:
        outside_torch = SHARED_GPU_NON_TORCH_BYTES
    else:
        # The CUDA context, NCCL buffers and other processes hold memory torch does not count.
        outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    kv_bytes = int(gpu_memory_utilization * total) - torch_peak - outside_torch
    num_blocks = kv_bytes // block_bytes
    logger.info(
        "GPU memory: total %.2f GiB, torch peak (weights + activations) %.2f GiB, "
        "outside torch %.2f GiB -> KV cache %.2f GiB (%d blocks)",
        total / GiB,
        torch_peak / GiB,
        outside_torch / GiB,
        max(kv_bytes, 0) / GiB,
        max(num_blocks, 0),
    )
    if num_blocks < 1:
        raise ValueError(
            f"no KV block fits: gpu_memory_utilization={gpu_memory_utilization} of "
            f"{total / GiB:.2f} GiB leaves {kv_bytes / GiB:.3f} GiB after the model "
            f"({torch_peak / GiB:.2f} GiB peak); raise it or lower max_num_batched_tokens"
        )
    return min(num_blocks, max_blocks)

"""KV pool sizing: the CPU budget's checks, and the GPU profile (cuda only)."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.worker import kv_sizing


def test_cpu_blocks_from_budget_and_cap():
    assert kv_sizing.num_cpu_blocks(10_000, 1000, max_blocks=100) == 10
    assert kv_sizing.num_cpu_blocks(10_000, 1000, max_blocks=4) == 4
    assert kv_sizing.max_useful_blocks(max_num_seqs=3, max_model_len=17, block_size=16) == 6


def test_cpu_budget_errors():
    with pytest.raises(ValueError, match="holds no KV block"):
        kv_sizing.num_cpu_blocks(100, 1000, max_blocks=10)
    too_much = kv_sizing.available_ram_bytes() * 4
    with pytest.raises(ValueError, match="exceeds the available RAM"):
        kv_sizing.num_cpu_blocks(too_much, 1000, max_blocks=10)


@pytest.mark.cuda
def test_gpu_blocks_leave_room_for_weights_and_activations():
    device = torch.device("cuda")
    total = torch.cuda.mem_get_info(device)[1]
    weights = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def profile_step():
        activations = torch.empty(512 << 20, dtype=torch.uint8, device=device)
        del activations

    block_bytes = 1 << 20
    n = kv_sizing.num_gpu_blocks(profile_step, 0.5, block_bytes, 1 << 30, device)
    # The peak (weights + activations) is subtracted from half of the device.
    assert 0 < n <= (total // 2 - (768 << 20)) // block_bytes
    assert kv_sizing.num_gpu_blocks(profile_step, 0.5, block_bytes, 7, device) == 7
    del weights

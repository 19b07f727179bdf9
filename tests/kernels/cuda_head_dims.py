"""The head_dims the CUDA attention launchers have kernels for, and the skip for the rest.

csrc/cuda/{prefill,decode}_attention.cu instantiate head_dim 64 and 128 only and reject any
other with a ValueError (tests/kernels/test_cuda_module.py checks that message). The CPU
module takes 1..256, so the shared tests keep their other head_dims on CPU and skip them on
CUDA with the reason, instead of failing there on a limit that is by design.
"""

from __future__ import annotations

import pytest
import torch

CUDA_ATTENTION_HEAD_DIMS = (64, 128)


def skip_without_cuda_kernel(device: torch.device, head_dim: int) -> None:
    if device.type == "cuda" and head_dim not in CUDA_ATTENTION_HEAD_DIMS:
        pytest.skip(
            f"head_dim {head_dim} has no CUDA attention kernel (allowed: "
            f"{', '.join(map(str, CUDA_ATTENTION_HEAD_DIMS))}); checked on CPU"
        )

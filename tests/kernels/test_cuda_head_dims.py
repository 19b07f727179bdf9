"""The CUDA head_dim skip: only CUDA cells with a head_dim the launchers reject skip."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cuda_head_dims import CUDA_ATTENTION_HEAD_DIMS, skip_without_cuda_kernel


@pytest.mark.parametrize("head_dim", [16, 32, 40, 80, 256])
def test_cuda_cells_without_a_kernel_skip_with_the_reason(head_dim):
    with pytest.raises(pytest.skip.Exception, match=rf"head_dim {head_dim} .*allowed: 64, 128"):
        skip_without_cuda_kernel(torch.device("cuda"), head_dim)


@pytest.mark.parametrize("head_dim", CUDA_ATTENTION_HEAD_DIMS)
def test_cuda_cells_with_a_kernel_run(head_dim):
    skip_without_cuda_kernel(torch.device("cuda"), head_dim)


@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 256])
def test_cpu_cells_always_run(head_dim):
    skip_without_cuda_kernel(torch.device("cpu"), head_dim)

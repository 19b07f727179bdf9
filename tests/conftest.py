"""Shared test fixtures: the device grid and the cuda marker's skip."""

from __future__ import annotations

import pytest
import torch

from distserve_rt import _native


def cuda_available() -> bool:
    return torch.cuda.is_available() and _native.has_cuda_module()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the distserve_rt._cuda module")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Tests that take `device` run on CPU and, marked `cuda`, on the GPU: one test, both paths.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh seeded generator: random, never-zero inputs that are reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def restore_num_threads():
    """Tests that change the CPU kernels' thread count put it back afterwards."""
    before = _native.get_num_threads()
    yield
    _native.set_num_threads(before)

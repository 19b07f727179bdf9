"""pytest-benchmark set-up for the op microbenchmarks.

Run: `make bench` or
  .venv/bin/python -m pytest bench --benchmark-only \
      --benchmark-json=bench/results/pytest_benchmark_cpu.json
Thread count: DRT_BENCH_THREADS (default: all cores), applied to our kernels and torch.
"""

from __future__ import annotations

import os

import pytest
import torch

from distserve_rt import _native
from distserve_rt.benchmarks.environment import environment


def pytest_configure(config):
    threads = int(os.environ.get("DRT_BENCH_THREADS", os.cpu_count() or 1))
    _native.set_num_threads(threads)
    torch.set_num_threads(threads)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Our provenance record (commit, CPU, threads, versions, command) beside pytest-benchmark's.
    output_json["distserve_rt"] = environment()


@pytest.fixture
def checked():
    """Checks a case against its fp32 reference before it is timed (never time a wrong op)."""

    def _check(case):
        err = case.check()
        assert err <= case.tolerance, f"{case.label}: relative error {err:.3g}"
        return case

    return _check

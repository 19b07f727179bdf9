"""Nothing but `drt-run serve` needs the HTTP server's packages (the GPU machine has none):
run through bench/gpu/no_server_deps.py, which makes fastapi, uvicorn, starlette and
pydantic import as if not installed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITHOUT_SERVER = [sys.executable, str(ROOT / "bench/gpu/no_server_deps.py"), "-m"]


def run_without_server(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*WITHOUT_SERVER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_wrapper_hides_the_server_packages():
    out = run_without_server("fastapi")
    assert out.returncode == 1 and "No module named 'fastapi'" in out.stderr


def test_bench_and_serve_help_need_no_server_packages():
    for command in ("bench", "serve"):
        out = run_without_server("distserve_rt.entrypoints.cli", command, "--help")
        assert out.returncode == 0, out.stderr
        assert f"usage: drt-run {command}" in out.stdout


def test_serve_without_them_says_what_is_missing_before_building_an_engine():
    out = run_without_server("distserve_rt.entrypoints.cli", "serve")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "drt-run serve: the HTTP server needs fastapi, uvicorn, not installed here "
        "(pip install fastapi uvicorn); the other drt-run commands work without them"
    ]


def test_the_cuda_tests_collect_and_the_server_tests_skip():
    # What bench/gpu/first_run.sh collects on the GPU machine; a module that imports the
    # server at collection would be an error here (and zero tests run there).
    out = run_without_server(
        "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider",
        "tests/kernels/test_cuda_module.py", "tests/e2e/test_disagg_gpu.py",
        "tests/entrypoints", "tests/benchmarks/test_bench_cli.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    # "N/M tests collected (K deselected) in T s", with ", E errors" before "in" on failure.
    assert re.search(r"^\d+/\d+ tests collected \(\d+ deselected\) in ", out.stdout, re.M)
    assert "tests/kernels/test_cuda_module.py::" in out.stdout
    assert "tests/e2e/test_disagg_gpu.py::" in out.stdout

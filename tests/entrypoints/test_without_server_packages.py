"""Nothing but `drt-run serve` needs the HTTP server's packages (the GPU machine has none):
run through bench/gpu/no_server_deps.py, which makes fastapi, uvicorn, starlette and
pydantic import as if not installed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from distserve_rt.entrypoints.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
WITHOUT_SERVER = [sys.executable, str(ROOT / "bench/gpu/no_server_deps.py"), "-m"]


def run_without_server(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*WITHOUT_SERVER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_wrapper_hides_the_server_packages():
    out = run_without_server("fastapi")
    assert out.returncode == 1 and "No module named 'fastapi'" in out.stderr


def test_every_command_s_help_needs_no_server_packages():
    # One interpreter for all commands: each parser is built lazily, on its first use.
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'bench/gpu')!r})\n"
        "from no_server_deps import hide_server_packages\n"
        "hide_server_packages()\n"
        "from distserve_rt.entrypoints.cli import COMMANDS, main\n"
        "for command in COMMANDS:\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        print('exit', command, exc.code)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'uvicorn'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    exits = [line for line in out.stdout.splitlines() if line.startswith("exit ")]
    assert exits == [f"exit {command} 0" for command in COMMANDS]
    assert out.stdout.splitlines()[-1] == "[]"


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
        "tests/entrypoints/test_chat.py", "tests/entrypoints/test_cli.py",
        "tests/benchmarks/test_bench_cli.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
    # "N/M tests collected (K deselected) in T s", with ", E errors" before "in" on failure.
    assert re.search(r"^\d+/\d+ tests collected \(\d+ deselected\) in ", out.stdout, re.M)
    assert "tests/kernels/test_cuda_module.py::" in out.stdout
    assert "tests/e2e/test_disagg_gpu.py::" in out.stdout

"""Shows that the emulated CUDA kernel tests catch realistic kernel bugs.

Copies the native sources (CMakeLists.txt, include/, csrc/) to a scratch folder, builds the
emulated module `_cuda_emu` there once unchanged (its tests must pass), then for each
planted bug: applies it to the scratch copy, rebuilds (ninja: only the affected launcher),
runs tests/kernels/test_cuda_emulated.py (the kernel tests) against that build
(DRT_CUDA_EMU_MODULE) and reverts it. Prints a Markdown table (bug, tests failed, which
ones) for bench/gpu/NOTES.md. The repository's own sources are never modified.

    python bench/gpu/plant_bugs.py [--scratch DIR] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA = "include/distserve_rt/cuda"
ORDERS = ["forward", "reverse", "random"]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str


BUGS = [
    Bug(
        "ldmatrix matrix order swapped (K tile of S = Q K^T)",
        f"{CUDA}/prefill_mma_steps.cuh",
        "const int key = nn * 16 + (mat >> 1) * 8 + (lane & 7);",
        "const int key = nn * 16 + (mat & 1) * 8 + (lane & 7);",
    ),
    Bug(
        "causal mask off by one (a query sees the next token)",
        f"{CUDA}/prefill_mma_steps.cuh",
        "const bool masked = kMasked && (key > row_pos[e / 2] || key >= kv_len);",
        "const bool masked = kMasked && (key > row_pos[e / 2] + 1 || key >= kv_len);",
    ),
    Bug(
        "causal mask off by one in the fp32 SIMT kernel",
        f"{CUDA}/prefill_simt.cuh",
        "s[r][c] = key > row_pos[r] || key >= kv_len",
        "s[r][c] = key > row_pos[r] + 1 || key >= kv_len",
    ),
    Bug(
        ".trans dropped from the V ldmatrix (O += P V)",
        f"{CUDA}/prefill_mma_steps.cuh",
        "ldmatrix_x4_trans(b, v_tile",
        "ldmatrix_x4(b, v_tile",
    ),
    Bug(
        "prefill: __syncthreads after the V wait removed",
        f"{CUDA}/prefill_mma.cuh",
        "    __syncthreads();  // V(nt) landed; every warp is done with K(nt)\n",
        "\n",
    ),
    Bug(
        "SIMT decode: __syncthreads after the tile wait removed",
        f"{CUDA}/decode_attention.cuh",
        "    cp_async_wait<1>();\n    __syncthreads();\n",
        "    cp_async_wait<1>();\n\n",
    ),
    Bug(
        "SIMT decode: cp.async.wait_group loosened (1 -> 2 pending)",
        f"{CUDA}/decode_attention.cuh",
        "cp_async_wait<1>();",
        "cp_async_wait<2>();",
    ),
    Bug(
        "tensor-core decode: __syncthreads after the V wait removed",
        f"{CUDA}/decode_mma.cuh",
        "    cp_async_wait<0>();\n    __syncthreads();  // V(t) landed",
        "    cp_async_wait<0>();\n    // V(t) landed",
    ),
    Bug(
        "tensor-core decode: cp.async.wait_group loosened before S (0 -> 1 pending)",
        f"{CUDA}/decode_mma.cuh",
        "    cp_async_wait<0>();\n    __syncthreads();  // K(t) landed",
        "    cp_async_wait<1>();\n    __syncthreads();  // K(t) landed",
    ),
    Bug(
        "prefill: cp.async.wait_group loosened before S (0 -> 1 pending)",
        f"{CUDA}/prefill_mma.cuh",
        "    cp_async_wait<0>();\n    __syncthreads();  // K(nt)",
        "    cp_async_wait<1>();\n    __syncthreads();  // K(nt)",
    ),
]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is needed (pip install {name})")
    return found


def _build(scratch: Path, jobs: int) -> float:
    start = time.monotonic()
    subprocess.run(
        [
            _tool("cmake"),
            "--build",
            str(scratch / "build"),
            "--target",
            "_cuda_emu",
            "-j",
            str(jobs),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - start


def _configure(scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("CMakeLists.txt", "include", "csrc"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, scratch / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, scratch / name)
    subprocess.run(
        [
            _tool("cmake"),
            "-S",
            str(scratch),
            "-B",
            str(scratch / "build"),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDRT_OUTPUT_DIR={scratch / 'out'}",
            "-DDRT_CUDA=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _run_tests(scratch: Path) -> tuple[int, int, str]:
    """(failed, passed, which tests failed) of the emulated tests against the scratch build;
    the failures are counted per test function and per warp order."""
    module = next((scratch / "out").glob("_cuda_emu*.so"))
    env = {**os.environ, "DRT_CUDA_EMU_MODULE": str(module), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rf",
            "-p",
            "no:cacheprovider",
            "--tb=no",
            "tests/kernels/test_cuda_emulated.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = result.stdout
    failed = int(m[1]) if (m := re.search(r"(\d+) failed", out)) else 0
    passed = int(m[1]) if (m := re.search(r"(\d+) passed", out)) else 0
    tests = Counter(re.findall(r"^FAILED \S+::(\w+)", out, flags=re.MULTILINE))
    orders = Counter(re.findall(r"^FAILED \S+\[(forward|reverse|random)", out, flags=re.MULTILINE))
    which = ", ".join(f"{name} x{count}" for name, count in tests.items())
    if orders:
        which += " (warp orders: " + ", ".join(f"{o} {orders[o]}" for o in ORDERS) + ")"
    return failed, passed, which


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="drt-plant-bugs-"))
    _configure(scratch)
    seconds = _build(scratch, args.jobs)
    failed, passed, which = _run_tests(scratch)
    print(f"baseline: build {seconds:.0f} s, {passed} passed, {failed} failed", flush=True)
    if failed:
        print(f"the unchanged kernels fail the emulated tests: {which}")
        return 1
    rows = []
    for bug in BUGS:
        path = scratch / bug.path
        original = path.read_text()
        if original.count(bug.old) != 1:
            raise SystemExit(
                f"{bug.name}: the pattern occurs {original.count(bug.old)} times in {bug.path}"
            )
        path.write_text(original.replace(bug.old, bug.new))
        try:
            seconds = _build(scratch, args.jobs)
            failed, passed, which = _run_tests(scratch)
        finally:
            path.write_text(original)
        rows.append((bug, failed, passed, which))
        print(f"{bug.name}: build {seconds:.0f} s, {failed} failed / {passed} passed", flush=True)
    _build(scratch, args.jobs)  # leave the scratch build unchanged
    print("\n| planted bug | file | emulated tests failed | failing tests |")
    print("|---|---|---|---|")
    for bug, failed, passed, which in rows:
        where = f"`{Path(bug.path).name}`"
        print(f"| {bug.name} | {where} | {failed} of {failed + passed} | {which} |")
    return 0 if all(failed > 0 for _, failed, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

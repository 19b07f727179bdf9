"""FastDivmod (include/distserve_rt/cuda/fast_divmod.cuh), the multiply-high division the CUDA
kernels use for the GQA group and the block size, compiled with the host C++ compiler and
checked against `/` (no GPU needed: the header is plain C++ outside nvcc)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

# Divisors: every small one (group sizes, block sizes, odd ones), powers of two and their
# neighbours, and the largest allowed. Dividends: the ends of each type's range, every value
# near multiples of the divisor at the top, and a dense low range.
HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
#include "distserve_rt/cuda/fast_divmod.cuh"
using drt::cuda::FastDivmod;

template <typename Int>
int check(int64_t d, Int n) {
  const auto f = FastDivmod<Int>::make(d);
  const Int q = f.div(n);
  if (q == n / static_cast<Int>(d) && f.mod(n, q) == n % static_cast<Int>(d)) return 0;
  std::printf("FAIL bits=%d d=%lld n=%lld q=%lld\n", int(8 * sizeof(Int)), (long long)d,
              (long long)n, (long long)q);
  return 1;
}

int main() {
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= 1100; ++d) divisors.push_back(d);
  for (int s = 11; s < 31; ++s)
    for (int64_t e : {-1, 0, 1}) divisors.push_back((int64_t{1} << s) + e);
  divisors.push_back(INT32_MAX);
  int failures = 0;
  for (int64_t d : divisors) {
    for (int32_t n = 0; n < 4096; ++n) failures += check<int32_t>(d, n) + check<int64_t>(d, n);
    for (int32_t i = 0; i < 4096; ++i) failures += check<int32_t>(d, INT32_MAX - i);
    for (int64_t i = 0; i < 4096; ++i) failures += check<int64_t>(d, INT64_MAX - i);
    for (int64_t k : {int64_t{1} << 20, int64_t{1} << 40, INT64_MAX / d - 1}) {
      for (int64_t e = -2; e <= 2; ++e) {
        const int64_t n = k * d + e;
        if (n >= 0) failures += check<int64_t>(d, n);
        if (n >= 0 && n <= INT32_MAX) failures += check<int32_t>(d, static_cast<int32_t>(n));
      }
    }
    if (failures > 10) break;
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_fast_divmod_equals_division(tmp_path):
    source = tmp_path / "fast_divmod_check.cpp"
    source.write_text(HARNESS)
    binary = tmp_path / "fast_divmod_check"
    subprocess.run(
        [CXX, "-std=c++17", "-O2", f"-I{REPO / 'include'}", str(source), "-o", str(binary)],
        check=True,
    )
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert run.stdout.strip().endswith("0 failures")

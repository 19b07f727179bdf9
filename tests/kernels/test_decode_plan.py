"""The CUDA decode split planner (include/distserve_rt/cuda/decode_plan.cuh), compiled with the
host C++ compiler (no GPU): the launch never uses more splits than decode_workspace_bytes
sized the workspace for, the splits fill the SMs at batch 1, and every token is covered."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

HARNESS = r"""
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include "distserve_rt/cuda/decode_plan.cuh"
using namespace drt::cuda;

int failures = 0;
#define EXPECT(cond, ...) \
  if (!(cond)) { ++failures; std::printf("FAIL " __VA_ARGS__); std::printf("\n"); }

int main() {
  // The workspace bounds the launch's splits for every num_kv_heads, head tiling and device.
  for (int64_t batch : {1, 2, 3, 7, 32, 100, 256, 2048, 5000})
    for (int64_t kv_heads : {1, 2, 8, 32})
      for (int64_t tiles : {1, 2, 8})
        for (int64_t max_len : {1, 100, 128, 129, 512, 513, 4096, 32768, 1 << 20})
          for (int64_t fill : {1, 132, 1056, 2048, 100000}) {
            const int64_t heads = kv_heads * tiles * 8, head_dim = 128;
            const int splits = decode_num_splits(max_len, batch * kv_heads * tiles, fill);
            const int64_t need = splits == 1 ? 0 : decode_partial_out_offset(batch, heads, splits) +
                                                   batch * heads * splits * head_dim * 4;
            EXPECT(splits >= 1 && splits <= kDecodeMaxSplits, "splits %d", splits);
            EXPECT(need <= decode_workspace_bytes(batch, heads, head_dim, max_len),
                   "workspace batch=%lld kv=%lld len=%lld fill=%lld", (long long)batch,
                   (long long)kv_heads, (long long)max_len, (long long)fill);
          }
  // Batch 1, 8 KV heads, 4k on an H200 (132 SMs, 8 CTAs each): every SM gets a CTA; the
  // old count (max_seq_len / 512 = 8 splits) gave 64 CTAs.
  const int h200 = decode_num_splits(4096, 8, 132 * 8);
  EXPECT(h200 * 8 >= 132, "batch 1 splits %d", h200);
  std::printf("batch1_splits=%d\n", h200);
  // A batch that fills the device alone is not split (no merge kernel).
  EXPECT(decode_num_splits(4096, 256 * 8, 132 * 8) == 1, "batch 256 split");
  EXPECT(decode_num_splits(128, 1, 132 * 8) == 1, "128 tokens split");
  EXPECT(decode_workspace_bytes(8, 32, 128, 128) == 0, "128 tokens need a workspace");
  // Every token of a sequence is in exactly one used split, whatever max_seq_len gave.
  for (int splits = 1; splits <= kDecodeMaxSplits; ++splits)
    for (int seq_len = 1; seq_len <= 9000; seq_len += (seq_len < 600 ? 1 : 37)) {
      const int per = decode_split_tokens(seq_len, splits);
      const int used = (seq_len + per - 1) / per;
      EXPECT(used <= splits && used * per >= seq_len && (used - 1) * per < seq_len,
             "cover splits=%d seq_len=%d", splits, seq_len);
    }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_decode_plan_fits_workspace_fills_sms_covers_tokens(tmp_path):
    source = tmp_path / "decode_plan_check.cpp"
    source.write_text(HARNESS)
    binary = tmp_path / "decode_plan_check"
    subprocess.run(
        [CXX, "-std=c++17", "-O1", f"-I{REPO / 'include'}", str(source), "-o", str(binary)],
        check=True,
    )
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    assert run.stdout.strip().endswith("0 failures")

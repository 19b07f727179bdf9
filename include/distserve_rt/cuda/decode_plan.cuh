// How many splits a decode launch uses, and the workspace they need (decode_attention.cuh).
// Plain C++ (no CUDA headers) so that a host compiler checks the planner
// (tests/kernels/test_decode_plan.py); the kernels call decode_split_tokens on the device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DRT_HOST_DEVICE __host__ __device__ inline
#else
#define DRT_HOST_DEVICE inline
#endif

namespace drt::cuda {

// A split covers at least this many tokens (FlashInfer's decode planner's smallest KV
// chunk): below it the merge costs more than the extra parallelism gains.
inline constexpr int kDecodeMinSplitTokens = 128;
// Bounds the workspace.
inline constexpr int kDecodeMaxSplits = 32;
// The planner never aims at more CTAs than this (an H200: 132 SMs x 8 resident CTAs = 1056),
// so that the workspace can be sized without a device: see decode_workspace_bytes.
inline constexpr int64_t kDecodeMaxFillCtas = 2048;

// The most splits a launch with this bound on seq_lens may use.
inline int decode_max_splits(int64_t max_seq_len) {
  const int64_t by_len = (max_seq_len + kDecodeMinSplitTokens - 1) / kDecodeMinSplitTokens;
  return static_cast<int>(by_len < 1 ? 1 : (by_len < kDecodeMaxSplits ? by_len : kDecodeMaxSplits));
}

// The planner (as FlashInfer's decode plan): enough splits that the launch's CTAs fill the
// `fill_ctas` slots the device runs at once (SMs x resident CTAs per SM) when batch x KV
// heads alone would not, never more than max_seq_len allows. ctas_per_split: batch x
// num_kv_heads x head tiles (>= batch).
inline int decode_num_splits(int64_t max_seq_len, int64_t ctas_per_split, int64_t fill_ctas) {
  if (fill_ctas > kDecodeMaxFillCtas) fill_ctas = kDecodeMaxFillCtas;
  if (ctas_per_split < 1) ctas_per_split = 1;
  const int64_t wanted = (fill_ctas + ctas_per_split - 1) / ctas_per_split;
  const int max_splits = decode_max_splits(max_seq_len);
  return static_cast<int>(wanted < 1 ? 1 : (wanted < max_splits ? wanted : max_splits));
}

// Tokens per split of one sequence: every token is covered even when seq_len exceeds the
// max_seq_len the split count came from (the splits just grow).
DRT_HOST_DEVICE int decode_split_tokens(int seq_len, int num_splits) {
  int per_split = (seq_len + num_splits - 1) / num_splits;
  per_split = (per_split + 31) / 32 * 32;
  return per_split > kDecodeMinSplitTokens ? per_split : kDecodeMinSplitTokens;
}

// Workspace layout: partial_lse [batch, num_heads, num_splits] float2 (max, sum), then at a
// 256-byte boundary partial_out [batch, num_heads, num_splits, head_dim] float.
inline int64_t decode_partial_out_offset(int64_t batch, int64_t num_heads, int num_splits) {
  const int64_t lse_bytes = batch * num_heads * num_splits * int64_t{8};
  return (lse_bytes + 255) / 256 * 256;
}

// Bytes for the split partials of any launch with these sizes, on any device: the planner's
// splits for the fewest CTAs per split (one KV head: ctas_per_split = batch) and the most
// fill it aims at bound the splits of every (num_kv_heads, device). 0: one split, the
// kernel writes the output directly.
inline int64_t decode_workspace_bytes(int64_t batch, int64_t num_heads, int64_t head_dim,
                                      int64_t max_seq_len) {
  const int num_splits = decode_num_splits(max_seq_len, batch, kDecodeMaxFillCtas);
  if (num_splits == 1 || batch == 0) return 0;
  return decode_partial_out_offset(batch, num_heads, num_splits) +
         batch * num_heads * num_splits * head_dim * int64_t{4};
}

// CTAs per KV head along the GQA group: groups larger than a CTA's rows are tiled.
inline int decode_num_head_tiles(int group, int rows_per_cta) {
  return (group + rows_per_cta - 1) / rows_per_cta;
}

}  // namespace drt::cuda

#undef DRT_HOST_DEVICE

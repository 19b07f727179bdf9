// Parameters, tiling and workspace size of paged decode attention (decode_attention.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/dtype.cuh"

namespace drt::cuda {

// A split covers at least this many tokens: below it the merge costs more than the extra
// parallelism gains (the partition size of vLLM's paged attention v2).
inline constexpr int kDecodeMinSplitTokens = 512;
// Bounds the workspace; 32 splits of >= 512 tokens already give >= 32 CTAs per KV head.
inline constexpr int kDecodeMaxSplits = 32;

// Splits of one launch, from the caller's bound on seq_lens only (no device read).
inline int decode_num_splits(int64_t max_seq_len) {
  int64_t splits = (max_seq_len + kDecodeMinSplitTokens - 1) / kDecodeMinSplitTokens;
  if (splits < 1) splits = 1;
  return static_cast<int>(splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits);
}

// Tokens per split of one sequence: every token is covered even when seq_len exceeds the
// max_seq_len the split count came from (the splits just grow).
__host__ __device__ inline int decode_split_tokens(int seq_len, int num_splits) {
  int per_split = (seq_len + num_splits - 1) / num_splits;
  per_split = (per_split + 31) / 32 * 32;
  return per_split > kDecodeMinSplitTokens ? per_split : kDecodeMinSplitTokens;
}

// Workspace layout: partial_lse [batch, num_heads, num_splits] float2 (max, sum), then at a
// 256-byte boundary partial_out [batch, num_heads, num_splits, head_dim] float.
inline int64_t decode_partial_out_offset(int64_t batch, int64_t num_heads, int num_splits) {
  const int64_t lse_bytes = batch * num_heads * num_splits * static_cast<int64_t>(sizeof(float2));
  return (lse_bytes + 255) / 256 * 256;
}

inline int64_t decode_workspace_bytes(int64_t batch, int64_t num_heads, int64_t head_dim,
                                      int64_t max_seq_len) {
  const int num_splits = decode_num_splits(max_seq_len);
  if (num_splits == 1 || batch == 0) return 0;  // one split writes the output directly
  return decode_partial_out_offset(batch, num_heads, num_splits) +
         batch * num_heads * num_splits * head_dim * static_cast<int64_t>(sizeof(float));
}

struct DecodeParams {
  const void* query;           // [batch, num_heads, head_dim], batch stride query_stride
  void* out;                   // [batch, num_heads, head_dim], batch stride out_stride
  const void* kv_cache;        // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  const int32_t* block_table;  // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;     // [batch]
  float2* partial_lse;         // [batch, num_heads, num_splits] (num_splits > 1 only)
  float* partial_out;          // [batch, num_heads, num_splits, head_dim]
  int batch;
  int num_heads;
  int num_kv_heads;
  int num_splits;
  int num_head_tiles;  // CTAs per KV head along the GQA group
  int heads_per_cta;   // query heads per CTA (<= Cfg::kRows)
  int64_t query_stride;
  int64_t out_stride;
  int64_t kv_block_stride;
  int num_blocks;
  int block_size;  // set by launch_decode_attention from its template argument
  int max_blocks_per_seq;
  float scale_log2;  // softmax_scale * log2(e)
};

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
struct DecodeConfig {
  static constexpr int kVec = kVecElems<T>;
  // Lanes that share one (query head, token) dot product: 8, 16 or 32, a divisor of a warp.
  static constexpr int kLanesPerRow = HEAD_DIM / kVec;
  static constexpr int kThreads = 128;
  static constexpr int kRows = kThreads / kLanesPerRow;
  // 32 KiB of double-buffered K/V tiles for either element size.
  static constexpr int kTileTokens = sizeof(T) == 4 ? 16 : 32;
  // Tokens scored before one online-softmax rescale.
  static constexpr int kChunk = 4;
  static constexpr int kChunksPerTile = kTileTokens / kChunk;
  static_assert(32 % kLanesPerRow == 0, "a row's lanes must sit in one warp");
};

// Shared memory of one CTA, in 16-byte words: [stage][token][HEAD_DIM / kVec].
template <typename Cfg>
struct DecodeSmem {
  uint4 k[2][Cfg::kTileTokens][Cfg::kLanesPerRow];
  uint4 v[2][Cfg::kTileTokens][Cfg::kLanesPerRow];
  float o[Cfg::kRows][Cfg::kLanesPerRow * Cfg::kVec];  // per-row partial outputs to merge
  float2 ml[Cfg::kRows];                               // per-row (max, sum)
};

}  // namespace drt::cuda

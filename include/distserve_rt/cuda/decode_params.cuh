// Parameters and tiling of paged decode attention (decode_attention.cuh); the split
// planner and the workspace size are in decode_plan.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/decode_plan.cuh"
#include "distserve_rt/cuda/dtype.cuh"

namespace drt::cuda {

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

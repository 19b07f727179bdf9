// Parameters and tile movement of prefill attention (prefill_attention.cuh has the design):
// cp.async loads of query / key / value tiles into padded shared memory, and the fused
// write of the new tokens' K/V from those tiles into the paged pool.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/dtype.cuh"
#include "distserve_rt/cuda/fast_divmod.cuh"

namespace drt::cuda {

struct PrefillParams {
  const void* query;            // [num_tokens, num_heads, head_dim], token stride query_stride
  const void* key;              // [num_tokens, num_kv_heads, head_dim], token stride key_stride
  const void* value;            // [num_tokens, num_kv_heads, head_dim], token stride value_stride
  void* out;                    // [num_tokens, num_heads, head_dim], token stride out_stride
  const int32_t* cu_seqlens;    // [batch + 1]
  void* kv_cache;               // [num_blocks, 2, num_kv_heads, block_size, head_dim] or null
  const int32_t* block_table;   // [batch, max_blocks_per_seq], with prefix_lens
  const int32_t* prefix_lens;   // [batch] or null: no cached prefix
  const int64_t* slot_mapping;  // [num_tokens] or null: the new K/V are not written
  int batch;
  int64_t num_tokens;
  int num_heads;
  int num_kv_heads;
  int group;                      // num_heads / num_kv_heads
  FastDivmod<int32_t> group_div;  // divides packed rows by group (set by the launcher)
  int64_t query_stride;
  int64_t key_stride;
  int64_t value_stride;
  int64_t out_stride;
  int num_blocks;
  int block_size;
  FastDivmod<int32_t> block_div;  // divides positions by block_size (set by the launcher)
  FastDivmod<int64_t> slot_div;   // divides slots by block_size (set by the launcher)
  int max_blocks_per_seq;
  int64_t kv_block_stride;
  float scale_log2;  // softmax_scale * log2(e)
};

// One sequence of the varlen batch as a CTA sees it. Rows of a CTA's M tile are packed
// (token, head) pairs, row = token * group + head_in_group, so that one K/V tile serves
// every query head of the KV head (GQA) and short sequences still fill the tile.
struct PrefillSeq {
  int64_t q_start;  // first row of the sequence in query/key/value/out/slot_mapping
  int num_q;        // new tokens
  int prefix;       // cached tokens before them (positions 0..prefix-1)
  bool bad;         // prefix_lens out of range: the rows are written as NaN
};

__device__ __forceinline__ PrefillSeq prefill_seq(const PrefillParams& p, int seq) {
  PrefillSeq s;
  // Clamped so that malformed cu_seqlens never reach rows outside [0, num_tokens).
  const int64_t begin = min(max(static_cast<int64_t>(p.cu_seqlens[seq]), int64_t{0}), p.num_tokens);
  const int64_t end = min(max(static_cast<int64_t>(p.cu_seqlens[seq + 1]), begin), p.num_tokens);
  s.q_start = begin;
  s.num_q = static_cast<int>(end - begin);
  s.prefix = p.prefix_lens != nullptr ? p.prefix_lens[seq] : 0;
  s.bad = s.prefix < 0 ||
          (s.prefix > 0 && s.prefix > static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size);
  return s;
}

// Shared-memory tile of kRows rows of HEAD_DIM elements, in 16-byte words, padded by one
// word per row so that ldmatrix / column reads of 8 consecutive rows hit 8 different banks.
template <typename T, int HEAD_DIM>
struct TileShape {
  static constexpr int kVec = kVecElems<T>;
  static constexpr int kVecsPerRow = HEAD_DIM / kVec;
  static constexpr int kStride = kVecsPerRow + 1;  // words per padded row
};

// cp.async of the M tile's query rows (packed rows m0 .. m0 + kRows); rows past the
// sequence are zero-filled.
template <typename T, int HEAD_DIM, int kRows, int kThreads>
__device__ __forceinline__ void load_q_tile(uint4* tile, const PrefillParams& p,
                                            const PrefillSeq& s, int kv_head, int m0) {
  using Shape = TileShape<T, HEAD_DIM>;
  const T* query = static_cast<const T*>(p.query);
  for (int i = threadIdx.x; i < kRows * Shape::kVecsPerRow; i += kThreads) {
    const int row = i / Shape::kVecsPerRow;
    const int vec = i % Shape::kVecsPerRow;
    const int packed = m0 + row;
    const int token = p.group_div.div(packed);
    const int head = kv_head * p.group + p.group_div.mod(packed, token);
    const bool valid = token < s.num_q;
    const T* src = valid ? query + (s.q_start + token) * p.query_stride +
                               static_cast<int64_t>(head) * HEAD_DIM + vec * Shape::kVec
                         : query;
    cp_async_16(tile + row * Shape::kStride + vec, src, valid);
  }
}

// cp.async of key (kind 0) or value (kind 1) rows for positions n0 .. n0 + kRows: the
// cached prefix comes from kv_cache through the block table, the new tokens from
// key/value. Positions past the sequence are zero-filled, bad block ids give NaN rows.
template <typename T, int HEAD_DIM, int kRows, int kThreads>
__device__ __forceinline__ void load_kv_tile(uint4* tile, int kind, const PrefillParams& p,
                                             const PrefillSeq& s, int seq, int kv_head, int n0) {
  using Shape = TileShape<T, HEAD_DIM>;
  const T* fresh = static_cast<const T*>(kind == 0 ? p.key : p.value);
  const int64_t fresh_stride = kind == 0 ? p.key_stride : p.value_stride;
  const T* cache = static_cast<const T*>(p.kv_cache);
  for (int i = threadIdx.x; i < kRows * Shape::kVecsPerRow; i += kThreads) {
    const int row = i / Shape::kVecsPerRow;
    const int vec = i % Shape::kVecsPerRow;
    const int pos = n0 + row;
    uint4* dst = tile + row * Shape::kStride + vec;
    const T* src = fresh;
    bool valid = false;
    if (pos < s.prefix) {
      const int table_index = p.block_div.div(pos);
      const int32_t block =
          p.block_table[static_cast<int64_t>(seq) * p.max_blocks_per_seq + table_index];
      if (block < 0 || block >= p.num_blocks) {
        *dst = nan_vec<T>();
        continue;
      }
      // [2, num_kv_heads, block_size, head_dim] inside the block, K before V.
      src = cache + block * p.kv_block_stride +
            ((static_cast<int64_t>(kind) * p.num_kv_heads + kv_head) * p.block_size +
             (pos - table_index * p.block_size)) *
                HEAD_DIM +
            vec * Shape::kVec;
      valid = true;
    } else if (pos < s.prefix + s.num_q) {
      src = fresh + (s.q_start + pos - s.prefix) * fresh_stride +
            static_cast<int64_t>(kv_head) * HEAD_DIM + vec * Shape::kVec;
      valid = true;
    }
    cp_async_16(dst, src, valid);
  }
}

// The fused write_kv: copies the tile rows that hold new tokens (positions prefix ..
// prefix + num_q) from shared memory to their slots. Only the CTA that runs a sequence's
// last M tile calls this, since it is the one whose key range covers every new token.
template <typename T, int HEAD_DIM, int kRows, int kThreads>
__device__ __forceinline__ void write_new_kv_rows(const uint4* tile, int kind,
                                                  const PrefillParams& p, const PrefillSeq& s,
                                                  int kv_head, int n0) {
  using Shape = TileShape<T, HEAD_DIM>;
  T* cache = static_cast<T*>(p.kv_cache);
  const int64_t num_slots = static_cast<int64_t>(p.num_blocks) * p.block_size;
  // Rolled: one CTA per sequence writes, and unrolled the loop's hoisted loads cost the
  // attention loop registers (and the fp32 kernel spills; see bench/gpu/NOTES.md).
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * Shape::kVecsPerRow; i += kThreads) {
    const int row = i / Shape::kVecsPerRow;
    const int vec = i % Shape::kVecsPerRow;
    const int pos = n0 + row;
    if (pos < s.prefix || pos >= s.prefix + s.num_q) continue;
    const int64_t slot = p.slot_mapping[s.q_start + pos - s.prefix];
    if (slot < 0 || slot >= num_slots) continue;  // padding, or an id out of range
    const int64_t block = p.slot_div.div(slot);
    const int offset = static_cast<int>(slot - block * p.block_size);
    T* dst = cache + block * p.kv_block_stride +
             ((static_cast<int64_t>(kind) * p.num_kv_heads + kv_head) * p.block_size + offset) *
                 HEAD_DIM +
             vec * Shape::kVec;
    *reinterpret_cast<uint4*>(dst) = tile[row * Shape::kStride + vec];
  }
}

// Writes NaN to the output rows of packed rows m0 .. m0 + kRows (a sequence whose
// prefix_lens entry is out of range: visible, never a silent wrong answer).
template <typename T, int HEAD_DIM, int kRows, int kThreads>
__device__ __forceinline__ void store_nan_rows(const PrefillParams& p, const PrefillSeq& s,
                                               int kv_head, int m0) {
  using Shape = TileShape<T, HEAD_DIM>;
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < kRows * Shape::kVecsPerRow; i += kThreads) {
    const int packed = m0 + i / Shape::kVecsPerRow;
    const int token = p.group_div.div(packed);
    if (token >= s.num_q) continue;
    const int head = kv_head * p.group + p.group_div.mod(packed, token);
    T* dst = out + (s.q_start + token) * p.out_stride + static_cast<int64_t>(head) * HEAD_DIM +
             (i % Shape::kVecsPerRow) * Shape::kVec;
    *reinterpret_cast<uint4*>(dst) = nan_vec<T>();
  }
}

}  // namespace drt::cuda

// CPU cache kernels: `write_kv` scatters the new tokens' K/V into the paged pool, and
// `copy_blocks` moves whole blocks between pools (the primitive of the KV transfer engine).
// Header-only, raw pointers, no torch (FlashInfer's first layer). The kernels guard every id
// they dereference and return kInvalidArgument instead of touching memory out of bounds; the
// launchers in csrc/cpu/cache_ops.cpp check the same ids first to name the bad one.
//
// Layout (see distserve_rt/core/kv_cache.py): one layer's kv_cache is
//   [num_blocks, 2, num_kv_heads, block_size, head_dim]   (HND inside a block)
// so one token's heads land block_size * head_dim elements apart, and its V half sits
// num_kv_heads * block_size * head_dim elements after its K half.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "distserve_rt/common.h"

namespace drt::cpu {

// Below this many bytes a call stays on the calling thread: waking the OpenMP team costs a
// few microseconds, about what one core needs to copy this much.
inline constexpr int64_t kParallelMinBytes = int64_t{256} << 10;

// copy_blocks cuts each block into chunks of at most this many bytes, so that a few large
// blocks (one request's KV for all layers is often MiBs) still spread over every thread.
inline constexpr int64_t kCopyChunkBytes = int64_t{512} << 10;

struct WriteKVParams {
  const void* key;    // [num_tokens, num_kv_heads, head_dim], row stride key_token_stride
  const void* value;  // [num_tokens, num_kv_heads, head_dim], row stride value_token_stride
  void* kv_cache;     // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  const int64_t* slot_mapping;  // [num_tokens], slot = block * block_size + offset, < 0 = padding
  int64_t num_tokens;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t key_token_stride;    // elements between tokens of key
  int64_t value_token_stride;  // elements between tokens of value
  int64_t num_blocks;
  int64_t block_size;
  int64_t kv_block_stride;  // elements between blocks of kv_cache (dims 1.. are contiguous)
};

// Copies one token's K and V (num_kv_heads rows of head_dim each) into its slot.
template <typename T>
inline void write_kv_token(const WriteKVParams& p, int64_t token, int64_t slot) {
  const int64_t head_stride = p.block_size * p.head_dim;  // heads of one token in a block
  const std::size_t row_bytes = static_cast<std::size_t>(p.head_dim) * sizeof(T);
  T* k_dst = static_cast<T*>(p.kv_cache) + (slot / p.block_size) * p.kv_block_stride +
             (slot % p.block_size) * p.head_dim;
  T* v_dst = k_dst + p.num_kv_heads * head_stride;
  const T* k_src = static_cast<const T*>(p.key) + token * p.key_token_stride;
  const T* v_src = static_cast<const T*>(p.value) + token * p.value_token_stride;
  for (int64_t h = 0; h < p.num_kv_heads; ++h) {
    std::memcpy(k_dst + h * head_stride, k_src + h * p.head_dim, row_bytes);
    std::memcpy(v_dst + h * head_stride, v_src + h * p.head_dim, row_bytes);
  }
}

// Scatters key/value into kv_cache by slot_mapping; negative slots (padding) are skipped.
// Slots >= num_blocks * block_size are skipped too and make the call return kInvalidArgument.
// Duplicate slots are the caller's to rule out (the launcher does): the last writer would win.
template <typename T>
inline Status write_kv(const WriteKVParams& p) {
  if (p.num_tokens < 0 || p.num_kv_heads < 1 || p.head_dim < 1 || p.block_size < 1 ||
      p.num_blocks < 0) {
    return Status::kInvalidArgument;
  }
  if (p.num_tokens == 0) return Status::kOk;
  const int64_t num_slots = p.num_blocks * p.block_size;
  const int64_t token_bytes = 2 * p.num_kv_heads * p.head_dim * static_cast<int64_t>(sizeof(T));
  const bool parallel = p.num_tokens > 1 && p.num_tokens * token_bytes >= kParallelMinBytes;
  int num_bad_slots = 0;
#pragma omp parallel for if (parallel) schedule(static) reduction(+ : num_bad_slots)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    if (slot >= num_slots) {
      ++num_bad_slots;
      continue;
    }
    write_kv_token<T>(p, t, slot);
  }
  return num_bad_slots == 0 ? Status::kOk : Status::kInvalidArgument;
}

struct CopyBlocksParams {
  const void* src;  // [src_num_blocks, ...] block i at src + i * src_block_stride_bytes
  void* dst;        // [dst_num_blocks, ...] block i at dst + i * dst_block_stride_bytes
  const int64_t* block_mapping;  // [num_pairs, 2] (src block, dst block)
  int64_t num_pairs;
  int64_t src_num_blocks;
  int64_t dst_num_blocks;
  int64_t src_block_stride_bytes;
  int64_t dst_block_stride_bytes;
  int64_t block_bytes;  // bytes copied per pair (one block, contiguous)
};

// Copies block_bytes for every (src block, dst block) pair of block_mapping. Work is split
// into chunks of at most kCopyChunkBytes so that threads share even a single large block.
// Pairs whose ids are out of range are skipped and make the call return kInvalidArgument.
// The caller rules out a dst written twice and a block both read and written (the launcher
// does): the result would depend on the order of the copies.
inline Status copy_blocks(const CopyBlocksParams& p) {
  if (p.num_pairs < 0 || p.block_bytes < 0) return Status::kInvalidArgument;
  if (p.num_pairs == 0 || p.block_bytes == 0) return Status::kOk;
  const int64_t chunk_bytes = std::min(p.block_bytes, kCopyChunkBytes);
  const int64_t chunks_per_block = (p.block_bytes + chunk_bytes - 1) / chunk_bytes;
  const int64_t num_chunks = p.num_pairs * chunks_per_block;
  const bool parallel = num_chunks > 1 && p.num_pairs * p.block_bytes >= kParallelMinBytes;
  const auto* src = static_cast<const char*>(p.src);
  auto* dst = static_cast<char*>(p.dst);
  int num_bad_pairs = 0;
  // Static schedule: each thread gets one contiguous run of chunks, so consecutive chunks of
  // a block stay on one core and the streams stay sequential.
#pragma omp parallel for if (parallel) schedule(static) reduction(+ : num_bad_pairs)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t pair = c / chunks_per_block;
    const int64_t offset = (c % chunks_per_block) * chunk_bytes;
    const int64_t src_block = p.block_mapping[2 * pair];
    const int64_t dst_block = p.block_mapping[2 * pair + 1];
    if (src_block < 0 || src_block >= p.src_num_blocks || dst_block < 0 ||
        dst_block >= p.dst_num_blocks) {
      num_bad_pairs += offset == 0 ? 1 : 0;
      continue;
    }
    const int64_t bytes = std::min(chunk_bytes, p.block_bytes - offset);
    std::memcpy(dst + dst_block * p.dst_block_stride_bytes + offset,
                src + src_block * p.src_block_stride_bytes + offset,
                static_cast<std::size_t>(bytes));
  }
  return num_bad_pairs == 0 ? Status::kOk : Status::kInvalidArgument;
}

}  // namespace drt::cpu

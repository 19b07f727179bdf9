// KV pool kernels: write_kv (scatter new tokens' K/V into their slots) and copy_blocks
// (block-granular copies between pools: the KV transfer engine's primitive).
//
// Both never touch memory outside the pools on bad ids: a slot or block id out of range is
// skipped (checking on the host would need a device synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/fast_divmod.cuh"

namespace drt::cuda {

struct WriteKVParams {
  const void* key;              // [num_tokens, num_kv_heads, head_dim], token stride below
  const void* value;            // [num_tokens, num_kv_heads, head_dim], token stride below
  void* kv_cache;               // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  const int64_t* slot_mapping;  // [num_tokens], slot = block * block_size + offset, < 0: padding
  int64_t num_tokens;
  int num_kv_heads;
  int head_dim;
  int64_t key_token_stride;    // elements
  int64_t value_token_stride;  // elements
  int64_t num_slots;           // num_blocks * block_size
  int block_size;
  FastDivmod<int64_t> slot_div;  // divides slots by block_size (set by the launcher)
  int64_t kv_block_stride;       // elements between blocks of kv_cache
};

// One CTA per token (grid-stride); threads cover heads x head_dim in VecT-sized pieces
// (uint4 = 16 bytes when head_dim * sizeof(T), the strides and the pointers allow it).
template <typename T, typename VecT>
__global__ void write_kv_kernel(WriteKVParams p) {
  constexpr int kElems = sizeof(VecT) / sizeof(T);
  const int vecs_per_head = p.head_dim / kElems;
  const int vecs_per_token = p.num_kv_heads * vecs_per_head;
  // Offset of the V half of a block: [2, num_kv_heads, block_size, head_dim], dim 1 = 1.
  const int64_t value_offset = static_cast<int64_t>(p.num_kv_heads) * p.block_size * p.head_dim;
  for (int64_t token = blockIdx.x; token < p.num_tokens; token += gridDim.x) {
    const int64_t slot = p.slot_mapping[token];
    if (slot < 0 || slot >= p.num_slots) continue;  // padding, or an id out of range
    const int64_t block = p.slot_div.div(slot);     // not a 64-bit div and rem subroutine
    const int offset = static_cast<int>(slot - block * p.block_size);
    const T* key = static_cast<const T*>(p.key) + token * p.key_token_stride;
    const T* value = static_cast<const T*>(p.value) + token * p.value_token_stride;
    T* cache = static_cast<T*>(p.kv_cache) + block * p.kv_block_stride;
    for (int i = threadIdx.x; i < vecs_per_token; i += blockDim.x) {
      const int head = i / vecs_per_head;
      const int dim = (i - head * vecs_per_head) * kElems;
      const int64_t src = static_cast<int64_t>(head) * p.head_dim + dim;
      const int64_t dst = (static_cast<int64_t>(head) * p.block_size + offset) * p.head_dim + dim;
      *reinterpret_cast<VecT*>(cache + dst) = *reinterpret_cast<const VecT*>(key + src);
      *reinterpret_cast<VecT*>(cache + value_offset + dst) =
          *reinterpret_cast<const VecT*>(value + src);
    }
  }
}

template <typename T, typename VecT>
cudaError_t launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  constexpr int kThreads = 128;
  constexpr int64_t kMaxGrid = 1 << 20;  // the grid-stride loop covers the rest
  const unsigned grid = static_cast<unsigned>(p.num_tokens < kMaxGrid ? p.num_tokens : kMaxGrid);
  write_kv_kernel<T, VecT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

struct CopyBlocksParams {
  const char* src;               // [src_num_blocks] blocks of block_bytes, src_block_stride apart
  char* dst;                     // [dst_num_blocks] blocks of block_bytes, dst_block_stride apart
  const int64_t* block_mapping;  // [num_pairs, 2] (src block, dst block), device memory
  int64_t num_pairs;
  int64_t src_num_blocks;
  int64_t dst_num_blocks;
  int64_t src_block_stride;  // bytes
  int64_t dst_block_stride;  // bytes
  int64_t block_bytes;
};

// grid.y walks the pairs, grid.x x threads walk one block's VecT words. Four independent
// loads are issued before their stores so that each thread keeps 64 bytes in flight (a
// copy is latency-bound otherwise); peer and IPC memory are read the same way.
template <typename VecT>
__global__ void copy_blocks_kernel(CopyBlocksParams p) {
  const int64_t num_words = p.block_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pair = blockIdx.y; pair < p.num_pairs; pair += gridDim.y) {
    const int64_t src_block = p.block_mapping[2 * pair];
    const int64_t dst_block = p.block_mapping[2 * pair + 1];
    if (src_block < 0 || src_block >= p.src_num_blocks) continue;
    if (dst_block < 0 || dst_block >= p.dst_num_blocks) continue;
    const VecT* src = reinterpret_cast<const VecT*>(p.src + src_block * p.src_block_stride);
    VecT* dst = reinterpret_cast<VecT*>(p.dst + dst_block * p.dst_block_stride);
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < num_words; i += 4 * stride) {
      const VecT w0 = src[i];
      const VecT w1 = src[i + stride];
      const VecT w2 = src[i + 2 * stride];
      const VecT w3 = src[i + 3 * stride];
      dst[i] = w0;
      dst[i + stride] = w1;
      dst[i + 2 * stride] = w2;
      dst[i + 3 * stride] = w3;
    }
    for (; i < num_words; i += stride) dst[i] = src[i];
  }
}

template <typename VecT>
cudaError_t launch_copy_blocks(const CopyBlocksParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int64_t kWordsPerCta = kThreads * 4;  // one pass of the unrolled loop
  constexpr int64_t kMaxCtasPerBlock = 1024;
  constexpr int64_t kMaxGridY = 65535;
  const int64_t num_words = p.block_bytes / static_cast<int64_t>(sizeof(VecT));
  int64_t ctas_per_block = (num_words + kWordsPerCta - 1) / kWordsPerCta;
  if (ctas_per_block > kMaxCtasPerBlock) ctas_per_block = kMaxCtasPerBlock;
  if (ctas_per_block < 1) ctas_per_block = 1;
  const int64_t grid_y = p.num_pairs < kMaxGridY ? p.num_pairs : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(ctas_per_block), static_cast<unsigned>(grid_y));
  copy_blocks_kernel<VecT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace drt::cuda

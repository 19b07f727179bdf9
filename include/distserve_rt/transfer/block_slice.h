// Block-slice copies of the KV transfer engine: move (part of) one request's blocks from a
// peer's pool into the local pool, re-slicing by layers and KV heads when the two instances
// use different parallelism (decode TP > prefill TP holds fewer heads per rank; a different
// PP split holds a different layer range). Header-only, raw pointers, no torch.
//
// Both pools are block-major (distserve_rt/core/kv_cache.py):
//   pool [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
// so inside one block, one (layer, K|V, head) is a contiguous run of
//   head_bytes = block_size * head_dim * element_size
// and a contiguous head range [h0, h0 + num_heads) of one (layer, K|V) is one run of
// num_heads * head_bytes. When the slice takes every head of both pools, the runs of
// consecutive layers touch, and a block's whole layer range is a single run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "distserve_rt/common.h"

// The geometry helpers run on the host and inside the CUDA kernel (block_slice.cuh).
#if defined(__CUDACC__)
#define DRT_HOST_DEVICE __host__ __device__
#else
#define DRT_HOST_DEVICE
#endif

namespace drt::transfer {

// One pool as the copy sees it (bytes, not elements).
struct PoolGeometry {
  int64_t num_blocks;
  int64_t num_layers;
  int64_t num_kv_heads;
  int64_t block_stride_bytes;  // bytes between blocks (>= num_layers * 2 * heads * head_bytes)
};

// Which part of a block moves: layers [src_layer_start, +num_layers) of the source land on
// [dst_layer_start, +num_layers) of the destination; heads likewise.
struct KVSliceSpec {
  int64_t src_layer_start;
  int64_t dst_layer_start;
  int64_t num_layers;
  int64_t src_head_start;
  int64_t dst_head_start;
  int64_t num_heads;
};

struct SliceCopyParams {
  const char* src;               // source pool base; block i at src + i * src.block_stride_bytes
  char* dst;                     // destination pool base
  const int64_t* block_mapping;  // [num_pairs, 2] (src block, dst block), host memory
  int64_t num_pairs;
  PoolGeometry src_pool;
  PoolGeometry dst_pool;
  int64_t head_bytes;  // block_size * head_dim * element_size (same in both pools)
  KVSliceSpec slice;
};

// How a block's slice decomposes into contiguous runs (the same for every pair).
struct SliceRuns {
  int64_t num_runs;
  int64_t run_bytes;
};

DRT_HOST_DEVICE inline bool slice_is_mergeable(const SliceCopyParams& p) {
  // Every head of both pools: (layer, K|V) runs are adjacent in both blocks.
  return p.slice.num_heads == p.src_pool.num_kv_heads &&
         p.slice.num_heads == p.dst_pool.num_kv_heads;
}

DRT_HOST_DEVICE inline SliceRuns slice_runs(const SliceCopyParams& p) {
  const int64_t head_run = p.slice.num_heads * p.head_bytes;
  if (slice_is_mergeable(p)) return {1, 2 * p.slice.num_layers * head_run};
  return {2 * p.slice.num_layers, head_run};
}

// Bytes moved per (src block, dst block) pair.
DRT_HOST_DEVICE inline int64_t slice_bytes_per_pair(const SliceCopyParams& p) {
  return 2 * p.slice.num_layers * p.slice.num_heads * p.head_bytes;
}

// Byte offset of run `run` inside a source (is_src) or destination block.
DRT_HOST_DEVICE inline int64_t slice_run_offset(const SliceCopyParams& p, int64_t run,
                                                bool is_src) {
  const PoolGeometry& pool = is_src ? p.src_pool : p.dst_pool;
  const int64_t layer_start = is_src ? p.slice.src_layer_start : p.slice.dst_layer_start;
  const int64_t head_start = is_src ? p.slice.src_head_start : p.slice.dst_head_start;
  const int64_t kv_bytes = pool.num_kv_heads * p.head_bytes;  // one (layer, K|V)
  if (slice_is_mergeable(p)) return layer_start * 2 * kv_bytes;
  const int64_t layer = layer_start + run / 2;
  const int64_t kv = run % 2;
  return (layer * 2 + kv) * kv_bytes + head_start * p.head_bytes;
}

// The geometry rules (the launchers check them first with messages; this is the guard).
inline bool slice_params_valid(const SliceCopyParams& p) {
  const KVSliceSpec& s = p.slice;
  return p.num_pairs >= 0 && p.head_bytes >= 1 && s.num_layers >= 1 && s.num_heads >= 1 &&
         s.src_layer_start >= 0 && s.dst_layer_start >= 0 && s.src_head_start >= 0 &&
         s.dst_head_start >= 0 && s.src_layer_start + s.num_layers <= p.src_pool.num_layers &&
         s.dst_layer_start + s.num_layers <= p.dst_pool.num_layers &&
         s.src_head_start + s.num_heads <= p.src_pool.num_kv_heads &&
         s.dst_head_start + s.num_heads <= p.dst_pool.num_kv_heads;
}

// A parallel copy splits each run into chunks of at most this many bytes so that a few
// large blocks still spread over every thread. A serial copy hands whole runs to memcpy:
// glibc streams copies above a few MiB with non-temporal stores (no read-for-ownership of
// the destination), ~1.3x faster than the same bytes in 512 KiB calls on an EPYC.
inline constexpr int64_t kSliceChunkBytes = int64_t{4} << 20;

// Copies the slice of every pair of block_mapping with `num_threads` OpenMP threads (1: the
// calling thread only). Pairs with ids out of range are skipped and make the call return
// kInvalidArgument; the caller rules out a dst block written twice.
inline Status copy_block_slices(const SliceCopyParams& p, int num_threads) {
  if (!slice_params_valid(p)) return Status::kInvalidArgument;
  if (p.num_pairs == 0) return Status::kOk;
  const SliceRuns runs = slice_runs(p);
  // Below 256 KiB a thread team costs more than it saves.
  const int64_t total_bytes = p.num_pairs * runs.num_runs * runs.run_bytes;
  const bool parallel = num_threads > 1 && total_bytes >= (int64_t{256} << 10);
  const int64_t chunk_bytes =
      parallel ? std::min(runs.run_bytes, kSliceChunkBytes) : runs.run_bytes;
  const int64_t chunks_per_run = (runs.run_bytes + chunk_bytes - 1) / chunk_bytes;
  const int64_t chunks_per_pair = runs.num_runs * chunks_per_run;
  const int64_t num_chunks = p.num_pairs * chunks_per_pair;
  (void)parallel;  // unused where this header is compiled without OpenMP (nvcc's host pass)
  int num_bad_pairs = 0;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static) \
    reduction(+ : num_bad_pairs)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t pair = c / chunks_per_pair;
    const int64_t run = (c % chunks_per_pair) / chunks_per_run;
    const int64_t offset = (c % chunks_per_run) * chunk_bytes;
    const int64_t src_block = p.block_mapping[2 * pair];
    const int64_t dst_block = p.block_mapping[2 * pair + 1];
    if (src_block < 0 || src_block >= p.src_pool.num_blocks || dst_block < 0 ||
        dst_block >= p.dst_pool.num_blocks) {
      num_bad_pairs += (c % chunks_per_pair) == 0 ? 1 : 0;
      continue;
    }
    const int64_t bytes = std::min(chunk_bytes, runs.run_bytes - offset);
    std::memcpy(
        p.dst + dst_block * p.dst_pool.block_stride_bytes + slice_run_offset(p, run, false) +
            offset,
        p.src + src_block * p.src_pool.block_stride_bytes + slice_run_offset(p, run, true) + offset,
        static_cast<std::size_t>(bytes));
  }
  return num_bad_pairs == 0 ? Status::kOk : Status::kInvalidArgument;
}

}  // namespace drt::transfer

// CUDA kernel of the block-slice copy (block_slice.h has the geometry): copy_blocks
// generalised to layer and head ranges, for pulls from a peer's pool mapped by CUDA IPC.
// Ids out of range are skipped, never dereferenced (checking them on the host would need
// the ids there; the launcher checks the host copy before uploading it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/transfer/block_slice.h"

namespace drt::transfer {

// grid.y walks (pair, run) items, grid.x x threads walk one run's VecT words. Four loads in
// flight per thread before their stores: a copy from peer memory is latency-bound otherwise.
template <typename VecT>
__global__ void block_slices_kernel(SliceCopyParams p, SliceRuns runs) {
  const int64_t num_words = runs.run_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t num_items = p.num_pairs * runs.num_runs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = blockIdx.y; item < num_items; item += gridDim.y) {
    const int64_t pair = item / runs.num_runs;
    const int64_t run = item % runs.num_runs;
    const int64_t src_block = p.block_mapping[2 * pair];
    const int64_t dst_block = p.block_mapping[2 * pair + 1];
    if (src_block < 0 || src_block >= p.src_pool.num_blocks) continue;
    if (dst_block < 0 || dst_block >= p.dst_pool.num_blocks) continue;
    const VecT* src = reinterpret_cast<const VecT*>(
        p.src + src_block * p.src_pool.block_stride_bytes + slice_run_offset(p, run, true));
    VecT* dst = reinterpret_cast<VecT*>(p.dst + dst_block * p.dst_pool.block_stride_bytes +
                                        slice_run_offset(p, run, false));
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
cudaError_t launch_block_slices(const SliceCopyParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int64_t kWordsPerCta = kThreads * 4;  // one pass of the unrolled loop
  constexpr int64_t kMaxCtasPerRun = 1024;
  constexpr int64_t kMaxGridY = 65535;
  const SliceRuns runs = slice_runs(p);
  const int64_t num_words = runs.run_bytes / static_cast<int64_t>(sizeof(VecT));
  int64_t ctas_per_run = (num_words + kWordsPerCta - 1) / kWordsPerCta;
  ctas_per_run =
      ctas_per_run < 1 ? 1 : (ctas_per_run > kMaxCtasPerRun ? kMaxCtasPerRun : ctas_per_run);
  const int64_t num_items = p.num_pairs * runs.num_runs;
  const int64_t grid_y = num_items < kMaxGridY ? num_items : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(ctas_per_run), static_cast<unsigned>(grid_y));
  block_slices_kernel<VecT><<<grid, kThreads, 0, stream>>>(p, runs);
  return cudaGetLastError();
}

}  // namespace drt::transfer

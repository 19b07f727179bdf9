// Launcher of the block-slice kernel: picks the widest word that divides every address and
// run length (16, 8, 4 or 1 bytes), so the common 16-byte-aligned pools copy in uint4.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/transfer.h"
#include "distserve_rt/transfer/block_slice.cuh"

namespace drt::cuda_ops {

cudaError_t launch_block_slices(const transfer::SliceCopyParams& p, cudaStream_t stream) {
  if (p.num_pairs == 0) return cudaSuccess;
  const transfer::SliceRuns runs = transfer::slice_runs(p);
  const uint64_t all = reinterpret_cast<std::uintptr_t>(p.src) |
                       reinterpret_cast<std::uintptr_t>(p.dst) |
                       static_cast<uint64_t>(p.src_pool.block_stride_bytes) |
                       static_cast<uint64_t>(p.dst_pool.block_stride_bytes) |
                       static_cast<uint64_t>(p.head_bytes) | static_cast<uint64_t>(runs.run_bytes);
  if (all % 16 == 0) return transfer::launch_block_slices<uint4>(p, stream);
  if (all % 8 == 0) return transfer::launch_block_slices<uint2>(p, stream);
  if (all % 4 == 0) return transfer::launch_block_slices<uint32_t>(p, stream);
  return transfer::launch_block_slices<uint8_t>(p, stream);
}

}  // namespace drt::cuda_ops

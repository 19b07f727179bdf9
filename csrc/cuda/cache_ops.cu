// Launchers of the KV pool kernels: write_kv, copy_blocks and its cudaMemcpyBatchAsync
// variant. Argument checks first (ValueError, no CUDA call made), then the launch.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/shape_checks.h"
#include "cuda/cuda_utils.h"
#include "cuda/ops.h"
#include "cuda/pointer_checks.h"
#include "distserve_rt/cuda/cache.cuh"

namespace drt::cuda_ops {
namespace {

// Widest word (16, 8, 4 or 1 bytes) dividing every address and size of a byte copy.
int copy_word_bytes(std::uintptr_t src, std::uintptr_t dst, int64_t src_stride, int64_t dst_stride,
                    int64_t block_bytes) {
  const uint64_t all = src | dst | static_cast<uint64_t>(src_stride) |
                       static_cast<uint64_t>(dst_stride) | static_cast<uint64_t>(block_bytes);
  for (int bytes : {16, 8, 4}) {
    if (all % bytes == 0) return bytes;
  }
  return 1;
}

void check_copy_args(std::uintptr_t src, std::uintptr_t dst, std::uintptr_t block_mapping,
                     int64_t num_pairs, int64_t src_num_blocks, int64_t dst_num_blocks,
                     int64_t src_block_stride_bytes, int64_t dst_block_stride_bytes,
                     int64_t block_bytes) {
  check_copy_blocks_shapes(num_pairs, src_num_blocks, dst_num_blocks, src_block_stride_bytes,
                           dst_block_stride_bytes, block_bytes);
  if (num_pairs == 0) return;
  check_arg(src != 0 && dst != 0 && block_mapping != 0,
            "src, dst and block_mapping must be non-null pointers when num_pairs > 0");
}

}  // namespace

void write_kv(std::uintptr_t key, std::uintptr_t value, std::uintptr_t kv_cache,
              std::uintptr_t slot_mapping, int64_t num_tokens, int64_t num_kv_heads,
              int64_t head_dim, int64_t key_token_stride, int64_t value_token_stride,
              int64_t num_blocks, int64_t block_size, int64_t kv_block_stride, int64_t dtype_code,
              std::uintptr_t stream) {
  const DType dtype = to_dtype(static_cast<int>(dtype_code));
  check_write_kv_shapes(num_tokens, num_kv_heads, head_dim, key_token_stride, value_token_stride,
                        num_blocks, block_size, kv_block_stride);
  if (num_tokens == 0) return;
  check_arg(key != 0 && value != 0 && kv_cache != 0 && slot_mapping != 0,
            "key, value, kv_cache and slot_mapping must be non-null pointers");

  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  const bool vec16 = aligned16_elems(head_dim, elem) && aligned16_elems(key_token_stride, elem) &&
                     aligned16_elems(value_token_stride, elem) &&
                     aligned16_elems(kv_block_stride, elem) && aligned16(key) && aligned16(value) &&
                     aligned16(kv_cache);
  drt::cuda::WriteKVParams p{};
  p.key = as_ptr<const void>(key);
  p.value = as_ptr<const void>(value);
  p.kv_cache = as_ptr<void>(kv_cache);
  p.slot_mapping = as_ptr<const int64_t>(slot_mapping);
  p.num_tokens = num_tokens;
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.key_token_stride = key_token_stride;
  p.value_token_stride = value_token_stride;
  p.num_slots = num_blocks * block_size;
  p.block_size = static_cast<int>(block_size);
  p.kv_block_stride = kv_block_stride;

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return vec16 ? drt::cuda::launch_write_kv<T, uint4>(p, cuda_stream)
                 : drt::cuda::launch_write_kv<T, T>(p, cuda_stream);
  });
  check_cuda(err, "write_kv kernel launch");
}

void copy_blocks(std::uintptr_t src, std::uintptr_t dst, std::uintptr_t block_mapping,
                 int64_t num_pairs, int64_t src_num_blocks, int64_t dst_num_blocks,
                 int64_t src_block_stride_bytes, int64_t dst_block_stride_bytes,
                 int64_t block_bytes, std::uintptr_t stream) {
  check_copy_args(src, dst, block_mapping, num_pairs, src_num_blocks, dst_num_blocks,
                  src_block_stride_bytes, dst_block_stride_bytes, block_bytes);
  if (num_pairs == 0) return;
  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  // A kernel touching memory the device cannot map kills the whole CUDA context, so the
  // three buffers are checked (and peer access enabled) on the host first.
  check_kernel_accessible(src, "src", guard.device());
  check_kernel_accessible(dst, "dst", guard.device());
  check_kernel_accessible(block_mapping, "block_mapping", guard.device());

  drt::cuda::CopyBlocksParams p{};
  p.src = as_ptr<const char>(src);
  p.dst = as_ptr<char>(dst);
  p.block_mapping = as_ptr<const int64_t>(block_mapping);
  p.num_pairs = num_pairs;
  p.src_num_blocks = src_num_blocks;
  p.dst_num_blocks = dst_num_blocks;
  p.src_block_stride = src_block_stride_bytes;
  p.dst_block_stride = dst_block_stride_bytes;
  p.block_bytes = block_bytes;
  cudaError_t err;
  switch (copy_word_bytes(src, dst, src_block_stride_bytes, dst_block_stride_bytes, block_bytes)) {
    case 16:
      err = drt::cuda::launch_copy_blocks<uint4>(p, cuda_stream);
      break;
    case 8:
      err = drt::cuda::launch_copy_blocks<uint2>(p, cuda_stream);
      break;
    case 4:
      err = drt::cuda::launch_copy_blocks<uint32_t>(p, cuda_stream);
      break;
    default:
      err = drt::cuda::launch_copy_blocks<uint8_t>(p, cuda_stream);
  }
  check_cuda(err, "copy_blocks kernel launch");
}

void copy_blocks_memcpy_batch(std::uintptr_t src, std::uintptr_t dst, std::uintptr_t block_mapping,
                              int64_t num_pairs, int64_t src_num_blocks, int64_t dst_num_blocks,
                              int64_t src_block_stride_bytes, int64_t dst_block_stride_bytes,
                              int64_t block_bytes, std::uintptr_t stream) {
  check_copy_args(src, dst, block_mapping, num_pairs, src_num_blocks, dst_num_blocks,
                  src_block_stride_bytes, dst_block_stride_bytes, block_bytes);
  // cudaMemcpyBatchAsync rejects the legacy default stream (handles 0 and 1).
  check_arg(stream > 1,
            "copy_blocks_memcpy_batch needs a non-default stream (cudaMemcpyBatchAsync rejects "
            "the legacy default stream); got stream ",
            stream, ", run it under torch.cuda.stream(torch.cuda.Stream())");
  if (num_pairs == 0) return;
  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  check_host_memory(block_mapping, "block_mapping");
  const int64_t* pairs = as_ptr<const int64_t>(block_mapping);  // [num_pairs, 2], host
  std::vector<void*> dsts(num_pairs);
  std::vector<const void*> srcs(num_pairs);
  std::vector<size_t> sizes(num_pairs, static_cast<size_t>(block_bytes));
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t s = pairs[2 * i];
    const int64_t d = pairs[2 * i + 1];
    check_arg(s >= 0 && s < src_num_blocks, "block_mapping[", i, "][0] = ", s,
              " is out of range: src has ", src_num_blocks, " blocks");
    check_arg(d >= 0 && d < dst_num_blocks, "block_mapping[", i, "][1] = ", d,
              " is out of range: dst has ", dst_num_blocks, " blocks");
    srcs[i] = as_ptr<const char>(src) + s * src_block_stride_bytes;
    dsts[i] = as_ptr<char>(dst) + d * dst_block_stride_bytes;
  }
  // One attribute set for every copy: sources are read in stream order (after the work
  // that produced them); copy engines are preferred so the copies overlap with kernels.
  cudaMemcpyAttributes attrs{};
  attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attrs.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attrs_index = 0;
  check_cuda(
      cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), static_cast<size_t>(num_pairs),
                           &attrs, &attrs_index, 1, cuda_stream),
      "cudaMemcpyBatchAsync of " + std::to_string(num_pairs) + " blocks");
}

}  // namespace drt::cuda_ops

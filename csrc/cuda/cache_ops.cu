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

void check_copy_args(const CopyBlocksArgs& a) {
  check_copy_blocks_shapes(a);
  if (a.num_pairs == 0) return;
  check_arg(a.src != 0 && a.dst != 0 && a.block_mapping != 0,
            "src, dst and block_mapping must be non-null pointers when num_pairs > 0");
}

}  // namespace

void write_kv(const WriteKVArgs& a, std::uintptr_t stream) {
  const DType dtype = to_dtype(a.dtype);
  check_write_kv_shapes(a);
  if (a.num_tokens == 0) return;
  check_arg(a.key != 0 && a.value != 0 && a.kv_cache != 0 && a.slot_mapping != 0,
            "key, value, kv_cache and slot_mapping must be non-null pointers");

  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  const bool vec16 =
      aligned16_elems(a.head_dim, elem) && aligned16_elems(a.key_token_stride, elem) &&
      aligned16_elems(a.value_token_stride, elem) && aligned16_elems(a.kv_block_stride, elem) &&
      aligned16(a.key) && aligned16(a.value) && aligned16(a.kv_cache);
  drt::cuda::WriteKVParams p{};
  p.key = as_ptr<const void>(a.key);
  p.value = as_ptr<const void>(a.value);
  p.kv_cache = as_ptr<void>(a.kv_cache);
  p.slot_mapping = as_ptr<const int64_t>(a.slot_mapping);
  p.num_tokens = a.num_tokens;
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.head_dim = static_cast<int>(a.head_dim);
  p.key_token_stride = a.key_token_stride;
  p.value_token_stride = a.value_token_stride;
  p.num_slots = a.num_blocks * a.block_size;
  p.block_size = static_cast<int>(a.block_size);
  p.slot_div = drt::cuda::FastDivmod<int64_t>::make(a.block_size);
  p.kv_block_stride = a.kv_block_stride;

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return vec16 ? drt::cuda::launch_write_kv<T, uint4>(p, cuda_stream)
                 : drt::cuda::launch_write_kv<T, T>(p, cuda_stream);
  });
  check_cuda(err, "write_kv kernel launch");
}

void copy_blocks(const CopyBlocksArgs& a, std::uintptr_t stream) {
  check_copy_args(a);
  if (a.num_pairs == 0) return;
  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  // A kernel touching memory the device cannot map kills the whole CUDA context, so the
  // three buffers are checked (and peer access enabled) on the host first.
  check_kernel_accessible(a.src, "src", guard.device());
  check_kernel_accessible(a.dst, "dst", guard.device());
  check_kernel_accessible(a.block_mapping, "block_mapping", guard.device());

  drt::cuda::CopyBlocksParams p{};
  p.src = as_ptr<const char>(a.src);
  p.dst = as_ptr<char>(a.dst);
  p.block_mapping = as_ptr<const int64_t>(a.block_mapping);
  p.num_pairs = a.num_pairs;
  p.src_num_blocks = a.src_num_blocks;
  p.dst_num_blocks = a.dst_num_blocks;
  p.src_block_stride = a.src_block_stride_bytes;
  p.dst_block_stride = a.dst_block_stride_bytes;
  p.block_bytes = a.block_bytes;
  cudaError_t err;
  switch (copy_word_bytes(a.src, a.dst, a.src_block_stride_bytes, a.dst_block_stride_bytes,
                          a.block_bytes)) {
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

void copy_blocks_memcpy_batch(const CopyBlocksArgs& a, std::uintptr_t stream) {
  check_copy_args(a);
  // cudaMemcpyBatchAsync rejects the legacy default stream (handles 0 and 1).
  check_arg(stream > 1,
            "copy_blocks_memcpy_batch needs a non-default stream (cudaMemcpyBatchAsync rejects "
            "the legacy default stream); got stream ",
            stream, ", run it under torch.cuda.stream(torch.cuda.Stream())");
  if (a.num_pairs == 0) return;
  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  check_host_memory(a.block_mapping, "block_mapping");
  const int64_t num_pairs = a.num_pairs;
  const int64_t* pairs = as_ptr<const int64_t>(a.block_mapping);  // [num_pairs, 2], host
  std::vector<void*> dsts(num_pairs);
  std::vector<const void*> srcs(num_pairs);
  std::vector<size_t> sizes(num_pairs, static_cast<size_t>(a.block_bytes));
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t s = pairs[2 * i];
    const int64_t d = pairs[2 * i + 1];
    check_arg(s >= 0 && s < a.src_num_blocks, "block_mapping[", i, "][0] = ", s,
              " is out of range: src has ", a.src_num_blocks, " blocks");
    check_arg(d >= 0 && d < a.dst_num_blocks, "block_mapping[", i, "][1] = ", d,
              " is out of range: dst has ", a.dst_num_blocks, " blocks");
    srcs[i] = as_ptr<const char>(a.src) + s * a.src_block_stride_bytes;
    dsts[i] = as_ptr<char>(a.dst) + d * a.dst_block_stride_bytes;
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

// Launcher of prefill attention: argument checks, then dispatch on dtype x head_dim
// (tensor-core kernel for fp16/bf16, CUDA-core kernel for fp32).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/shape_checks.h"
#include "cuda/cuda_utils.h"
#include "cuda/ops.h"
#include "distserve_rt/cuda/prefill_attention.cuh"

namespace drt::cuda_ops {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z

// CUDA's own size limits, checked before the shared rules (common/shape_checks.h): grid
// dimensions and the head_dims with a kernel.
void check_cuda_prefill_limits(int64_t batch, int64_t num_kv_heads, int64_t head_dim) {
  check_arg(batch <= kMaxGridYZ, "batch must be in [0, ", kMaxGridYZ, "], got ", batch);
  check_arg(num_kv_heads <= kMaxGridYZ, "num_kv_heads must be in [1, ", kMaxGridYZ, "], got ",
            num_kv_heads);
  check_arg(head_dim == 64 || head_dim == 128, "head_dim ", head_dim,
            " is not supported by the CUDA prefill_attention; allowed: 64, 128");
}

void check_row_alignment(std::uintptr_t ptr, int64_t stride, int64_t elem, const char* name) {
  check_arg(aligned16(ptr) && aligned16_elems(stride, elem), name,
            " must be 16-byte aligned with a 16-byte multiple token stride (got stride ", stride,
            ")");
}

}  // namespace

void prefill_attention(const PrefillAttentionArgs& a, std::uintptr_t stream) {
  const DType dtype = to_dtype(a.dtype);
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  // The backend limits first: an unsupported head_dim is named before the strides it breaks.
  check_cuda_prefill_limits(a.batch, a.num_kv_heads, a.head_dim);
  check_prefill_shapes(a);
  // 16-byte loads of the cache.
  if (a.kv_cache != 0) {
    check_arg(aligned16(a.kv_cache) && aligned16_elems(a.kv_block_stride, elem),
              "kv_cache must be 16-byte aligned with a 16-byte multiple block stride "
              "(kv_block_stride ",
              a.kv_block_stride, ")");
  }
  if (a.batch == 0 || a.num_tokens == 0) return;
  check_arg(a.query != 0 && a.key != 0 && a.value != 0 && a.out != 0 && a.cu_seqlens != 0,
            "query, key, value, out and cu_seqlens must be non-null pointers");
  check_row_alignment(a.query, a.query_token_stride, elem, "query");
  check_row_alignment(a.key, a.key_token_stride, elem, "key");
  check_row_alignment(a.value, a.value_token_stride, elem, "value");
  check_row_alignment(a.out, a.out_token_stride, elem, "out");

  drt::cuda::PrefillParams p{};
  p.query = as_ptr<const void>(a.query);
  p.key = as_ptr<const void>(a.key);
  p.value = as_ptr<const void>(a.value);
  p.out = as_ptr<void>(a.out);
  p.cu_seqlens = as_ptr<const int32_t>(a.cu_seqlens);
  p.kv_cache = as_ptr<void>(a.kv_cache);
  p.block_table = as_ptr<const int32_t>(a.block_table);
  p.prefix_lens = as_ptr<const int32_t>(a.prefix_lens);
  p.slot_mapping = as_ptr<const int64_t>(a.slot_mapping);
  p.batch = static_cast<int>(a.batch);
  p.num_tokens = a.num_tokens;
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.group_div = drt::cuda::FastDivmod<int32_t>::make(p.group);
  p.query_stride = a.query_token_stride;
  p.key_stride = a.key_token_stride;
  p.value_stride = a.value_token_stride;
  p.out_stride = a.out_token_stride;
  p.num_blocks = static_cast<int>(a.num_blocks);
  p.block_size = static_cast<int>(a.block_size);
  if (a.kv_cache != 0) {
    p.block_div = drt::cuda::FastDivmod<int32_t>::make(a.block_size);
    p.slot_div = drt::cuda::FastDivmod<int64_t>::make(a.block_size);
  }
  p.max_blocks_per_seq = static_cast<int>(a.max_blocks_per_seq);
  p.kv_block_stride = a.kv_block_stride;
  p.scale_log2 = static_cast<float>(a.softmax_scale * M_LOG2E);

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return DRT_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, [&] {
      return drt::cuda::launch_prefill_attention<T, HEAD_DIM>(p, a.max_seqlen_q, cuda_stream);
    });
  });
  check_cuda(err, "prefill_attention kernel launch");
}

}  // namespace drt::cuda_ops

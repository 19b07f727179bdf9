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

void prefill_attention(std::uintptr_t query, std::uintptr_t key, std::uintptr_t value,
                       std::uintptr_t out, std::uintptr_t cu_seqlens, int64_t batch,
                       int64_t num_tokens, int64_t max_seqlen_q, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t query_token_stride,
                       int64_t key_token_stride, int64_t value_token_stride,
                       int64_t out_token_stride, double softmax_scale, std::uintptr_t kv_cache,
                       std::uintptr_t block_table, std::uintptr_t prefix_lens,
                       std::uintptr_t slot_mapping, int64_t num_blocks, int64_t block_size,
                       int64_t kv_block_stride, int64_t max_blocks_per_seq, int64_t dtype_code,
                       std::uintptr_t stream) {
  const DType dtype = to_dtype(static_cast<int>(dtype_code));
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  // The backend limits first: an unsupported head_dim is named before the strides it breaks.
  check_cuda_prefill_limits(batch, num_kv_heads, head_dim);
  check_prefill_shapes(batch, num_tokens, max_seqlen_q, num_heads, num_kv_heads, head_dim,
                       query_token_stride, key_token_stride, value_token_stride, out_token_stride,
                       softmax_scale, kv_cache, block_table, prefix_lens, slot_mapping, num_blocks,
                       block_size, kv_block_stride, max_blocks_per_seq);
  // 16-byte loads of the cache.
  if (kv_cache != 0) {
    check_arg(aligned16(kv_cache) && aligned16_elems(kv_block_stride, elem),
              "kv_cache must be 16-byte aligned with a 16-byte multiple block stride "
              "(kv_block_stride ",
              kv_block_stride, ")");
  }
  if (batch == 0 || num_tokens == 0) return;
  check_arg(query != 0 && key != 0 && value != 0 && out != 0 && cu_seqlens != 0,
            "query, key, value, out and cu_seqlens must be non-null pointers");
  check_row_alignment(query, query_token_stride, elem, "query");
  check_row_alignment(key, key_token_stride, elem, "key");
  check_row_alignment(value, value_token_stride, elem, "value");
  check_row_alignment(out, out_token_stride, elem, "out");

  drt::cuda::PrefillParams p{};
  p.query = as_ptr<const void>(query);
  p.key = as_ptr<const void>(key);
  p.value = as_ptr<const void>(value);
  p.out = as_ptr<void>(out);
  p.cu_seqlens = as_ptr<const int32_t>(cu_seqlens);
  p.kv_cache = as_ptr<void>(kv_cache);
  p.block_table = as_ptr<const int32_t>(block_table);
  p.prefix_lens = as_ptr<const int32_t>(prefix_lens);
  p.slot_mapping = as_ptr<const int64_t>(slot_mapping);
  p.batch = static_cast<int>(batch);
  p.num_tokens = num_tokens;
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.group = static_cast<int>(num_heads / num_kv_heads);
  p.query_stride = query_token_stride;
  p.key_stride = key_token_stride;
  p.value_stride = value_token_stride;
  p.out_stride = out_token_stride;
  p.num_blocks = static_cast<int>(num_blocks);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks_per_seq = static_cast<int>(max_blocks_per_seq);
  p.kv_block_stride = kv_block_stride;
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return DRT_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, [&] {
      return drt::cuda::launch_prefill_attention<T, HEAD_DIM>(p, max_seqlen_q, cuda_stream);
    });
  });
  check_cuda(err, "prefill_attention kernel launch");
}

}  // namespace drt::cuda_ops

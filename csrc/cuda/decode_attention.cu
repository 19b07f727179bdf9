// Launcher of paged decode attention: argument checks, workspace size, dispatch on
// dtype x head_dim x block_size (3 x 2 x 3 instantiations).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/shape_checks.h"
#include "cuda/cuda_utils.h"
#include "cuda/ops.h"
#include "distserve_rt/cuda/decode_attention.cuh"

namespace drt::cuda_ops {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z

// CUDA's own size limits, checked before the shared rules (common/shape_checks.h): grid
// dimensions and the head_dim x block_size instantiations.
void check_cuda_decode_limits(int64_t batch, int64_t num_heads, int64_t head_dim,
                              int64_t block_size) {
  check_arg(batch <= kMaxGridYZ, "batch must be in [0, ", kMaxGridYZ, "], got ", batch);
  check_arg(num_heads <= kMaxGridYZ, "num_heads must be in [1, ", kMaxGridYZ, "], got ", num_heads);
  check_arg(head_dim == 64 || head_dim == 128, "head_dim ", head_dim,
            " is not supported by the CUDA decode_attention; allowed: 64, 128");
  check_arg(block_size == 8 || block_size == 16 || block_size == 32, "block_size ", block_size,
            " is not supported by the CUDA decode_attention; allowed: 8, 16, 32");
}

// The kernels read and write 16 bytes per thread: rows and pointers must allow it.
void check_decode_alignment(std::uintptr_t query, std::uintptr_t out, std::uintptr_t kv_cache,
                            std::uintptr_t workspace, int64_t query_stride, int64_t out_stride,
                            int64_t kv_block_stride, int64_t elem) {
  check_arg(aligned16(query) && aligned16_elems(query_stride, elem),
            "query must be 16-byte aligned with a 16-byte multiple batch stride (query_stride ",
            query_stride, ")");
  check_arg(aligned16(out) && aligned16_elems(out_stride, elem),
            "out must be 16-byte aligned with a 16-byte multiple batch stride (out_stride ",
            out_stride, ")");
  check_arg(aligned16(kv_cache) && aligned16_elems(kv_block_stride, elem),
            "kv_cache must be 16-byte aligned with a 16-byte multiple block stride "
            "(kv_block_stride ",
            kv_block_stride, ")");
  check_arg(aligned16(workspace), "workspace must be 16-byte aligned");
}

}  // namespace

int64_t decode_attention_workspace_bytes(int64_t batch, int64_t num_heads, int64_t head_dim,
                                         int64_t max_seq_len, std::uintptr_t /*stream*/) {
  check_decode_workspace_shapes(batch, num_heads, head_dim, max_seq_len);
  return drt::cuda::decode_workspace_bytes(batch, num_heads, head_dim, max_seq_len);
}

void decode_attention(std::uintptr_t query, std::uintptr_t out, std::uintptr_t kv_cache,
                      std::uintptr_t block_table, std::uintptr_t seq_lens, std::uintptr_t workspace,
                      int64_t workspace_bytes, int64_t batch, int64_t max_seq_len,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t query_stride, int64_t out_stride, double softmax_scale,
                      int64_t num_blocks, int64_t block_size, int64_t kv_block_stride,
                      int64_t max_blocks_per_seq, int64_t dtype_code, std::uintptr_t stream) {
  const DType dtype = to_dtype(static_cast<int>(dtype_code));
  // The backend limits first: an unsupported head_dim is named before the strides it breaks.
  check_cuda_decode_limits(batch, num_heads, head_dim, block_size);
  check_decode_shapes(batch, max_seq_len, num_heads, num_kv_heads, head_dim, query_stride,
                      out_stride, softmax_scale, num_blocks, block_size, kv_block_stride,
                      max_blocks_per_seq);
  const int64_t needed = drt::cuda::decode_workspace_bytes(batch, num_heads, head_dim, max_seq_len);
  check_arg(workspace_bytes >= needed, "workspace_bytes (", workspace_bytes, ") is less than the ",
            needed, " bytes decode_attention_workspace_bytes(batch=", batch,
            ", num_heads=", num_heads, ", head_dim=", head_dim, ", max_seq_len=", max_seq_len,
            ") asks for");
  if (batch == 0) return;
  check_arg(query != 0 && out != 0 && kv_cache != 0 && block_table != 0 && seq_lens != 0,
            "query, out, kv_cache, block_table and seq_lens must be non-null pointers");
  check_arg(needed == 0 || workspace != 0, "workspace must be non-null (", needed,
            " bytes are needed)");
  check_decode_alignment(query, out, kv_cache, workspace, query_stride, out_stride, kv_block_stride,
                         static_cast<int64_t>(dtype_size(dtype)));

  drt::cuda::DecodeParams p{};
  p.query = as_ptr<const void>(query);
  p.out = as_ptr<void>(out);
  p.kv_cache = as_ptr<const void>(kv_cache);
  p.block_table = as_ptr<const int32_t>(block_table);
  p.seq_lens = as_ptr<const int32_t>(seq_lens);
  p.num_splits = drt::cuda::decode_num_splits(max_seq_len);
  if (p.num_splits > 1) {
    char* base = as_ptr<char>(workspace);
    p.partial_lse = reinterpret_cast<float2*>(base);
    p.partial_out = reinterpret_cast<float*>(
        base + drt::cuda::decode_partial_out_offset(batch, num_heads, p.num_splits));
  }
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.query_stride = query_stride;
  p.out_stride = out_stride;
  p.kv_block_stride = kv_block_stride;
  p.num_blocks = static_cast<int>(num_blocks);
  p.max_blocks_per_seq = static_cast<int>(max_blocks_per_seq);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return DRT_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, [&] {
      return DRT_DISPATCH_BLOCK_SIZE(block_size, BLOCK_SIZE, [&] {
        return drt::cuda::launch_decode_attention<T, HEAD_DIM, BLOCK_SIZE>(p, cuda_stream);
      });
    });
  });
  check_cuda(err, "decode_attention kernel launch");
}

}  // namespace drt::cuda_ops

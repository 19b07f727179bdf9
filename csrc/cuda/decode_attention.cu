// Launcher of paged decode attention: argument checks, workspace size, the split count
// from the device's SM count and occupancy, dispatch on dtype x head_dim x block_size
// (3 x 2 x 3 instantiations), each routed to the tensor-core or the SIMT split kernel by
// the GQA group (decode_uses_mma).
#include <cuda_runtime.h>

#include <atomic>
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
void check_decode_alignment(const DecodeAttentionArgs& a, int64_t elem) {
  check_arg(aligned16(a.query) && aligned16_elems(a.query_stride, elem),
            "query must be 16-byte aligned with a 16-byte multiple batch stride (query_stride ",
            a.query_stride, ")");
  check_arg(aligned16(a.out) && aligned16_elems(a.out_stride, elem),
            "out must be 16-byte aligned with a 16-byte multiple batch stride (out_stride ",
            a.out_stride, ")");
  check_arg(aligned16(a.kv_cache) && aligned16_elems(a.kv_block_stride, elem),
            "kv_cache must be 16-byte aligned with a 16-byte multiple block stride "
            "(kv_block_stride ",
            a.kv_block_stride, ")");
  check_arg(aligned16(a.workspace), "workspace must be 16-byte aligned");
}

// Resident CTAs per SM of the split kernel decode_uses_mma picks (kMma), with its shared memory.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, bool kMma>
int decode_ctas_per_sm() {
  int per_sm = 0;
  if constexpr (kMma) {
    using Cfg = drt::cuda::DecodeMmaConfig<T, HEAD_DIM>;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                   &per_sm, drt::cuda::decode_mma_kernel<T, HEAD_DIM, BLOCK_SIZE>, Cfg::kThreads,
                   Cfg::kSmemBytes),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(decode_mma_kernel)");
  } else {
    using Cfg = drt::cuda::DecodeConfig<T, HEAD_DIM, BLOCK_SIZE>;
    check_cuda(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, drt::cuda::decode_split_kernel<T, HEAD_DIM, BLOCK_SIZE>, Cfg::kThreads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor(decode_split_kernel)");
  }
  return per_sm;
}

// CTAs of the split kernel the device runs at once (SMs x resident CTAs per SM): what the
// split planner fills. Queried once per (device, kernel): cudaGetDeviceProperties-class
// calls cost microseconds to milliseconds, a decode step calls this every layer.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, bool kMma>
int64_t decode_fill_ctas(int device) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int64_t> cache[kCachedDevices] = {};  // 0: not queried yet
  if (device >= 0 && device < kCachedDevices) {
    const int64_t cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int num_sms = 0;
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  const int per_sm = decode_ctas_per_sm<T, HEAD_DIM, BLOCK_SIZE, kMma>();
  const int64_t fill = static_cast<int64_t>(num_sms) * (per_sm > 0 ? per_sm : 1);
  if (device >= 0 && device < kCachedDevices) cache[device].store(fill, std::memory_order_relaxed);
  return fill;
}

// decode_fill_ctas of the kernel this launch takes.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
int64_t decode_fill_ctas(int device, bool mma) {
  if constexpr (sizeof(T) == 2) {
    if (mma) return decode_fill_ctas<T, HEAD_DIM, BLOCK_SIZE, true>(device);
  }
  return decode_fill_ctas<T, HEAD_DIM, BLOCK_SIZE, false>(device);
}

// Points the split partials into the workspace (its layout depends on the split count).
void set_workspace(drt::cuda::DecodeParams& p, const DecodeAttentionArgs& a) {
  if (p.num_splits == 1) return;
  char* base = as_ptr<char>(a.workspace);
  p.partial_lse = reinterpret_cast<float2*>(base);
  p.partial_out = reinterpret_cast<float*>(
      base + drt::cuda::decode_partial_out_offset(a.batch, a.num_heads, p.num_splits));
}

}  // namespace

int64_t decode_attention_workspace_bytes(const DecodeWorkspaceArgs& a) {
  check_decode_workspace_shapes(a);
  return drt::cuda::decode_workspace_bytes(a.batch, a.num_heads, a.head_dim, a.max_seq_len);
}

void decode_attention(const DecodeAttentionArgs& a, std::uintptr_t stream) {
  const DType dtype = to_dtype(a.dtype);
  // The backend limits first: an unsupported head_dim is named before the strides it breaks.
  check_cuda_decode_limits(a.batch, a.num_heads, a.head_dim, a.block_size);
  check_decode_shapes(a);
  const int64_t needed =
      drt::cuda::decode_workspace_bytes(a.batch, a.num_heads, a.head_dim, a.max_seq_len);
  check_arg(a.workspace_bytes >= needed, "workspace_bytes (", a.workspace_bytes,
            ") is less than the ", needed,
            " bytes decode_attention_workspace_bytes(batch=", a.batch, ", num_heads=", a.num_heads,
            ", head_dim=", a.head_dim, ", max_seq_len=", a.max_seq_len, ") asks for");
  if (a.batch == 0) return;
  check_arg(a.query != 0 && a.out != 0 && a.kv_cache != 0 && a.block_table != 0 && a.seq_lens != 0,
            "query, out, kv_cache, block_table and seq_lens must be non-null pointers");
  check_arg(needed == 0 || a.workspace != 0, "workspace must be non-null (", needed,
            " bytes are needed)");
  check_decode_alignment(a, static_cast<int64_t>(dtype_size(dtype)));

  drt::cuda::DecodeParams p{};
  p.query = as_ptr<const void>(a.query);
  p.out = as_ptr<void>(a.out);
  p.kv_cache = as_ptr<const void>(a.kv_cache);
  p.block_table = as_ptr<const int32_t>(a.block_table);
  p.seq_lens = as_ptr<const int32_t>(a.seq_lens);
  p.batch = static_cast<int>(a.batch);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.query_stride = a.query_stride;
  p.out_stride = a.out_stride;
  p.kv_block_stride = a.kv_block_stride;
  p.num_blocks = static_cast<int>(a.num_blocks);
  p.max_blocks_per_seq = static_cast<int>(a.max_blocks_per_seq);
  p.scale_log2 = static_cast<float>(a.softmax_scale * M_LOG2E);

  const cudaStream_t cuda_stream = as_stream(stream);
  StreamDeviceGuard guard(cuda_stream);
  const cudaError_t err = DRT_CUDA_DISPATCH_DTYPE(dtype, T, [&] {
    return DRT_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, [&] {
      return DRT_DISPATCH_BLOCK_SIZE(a.block_size, BLOCK_SIZE, [&] {
        // Never more splits than the workspace was sized for: decode_workspace_bytes bounds
        // this count over every num_kv_heads and device (decode_plan.cuh).
        const bool mma = drt::cuda::decode_uses_mma<T>(p.num_heads, p.num_kv_heads);
        p.num_splits = drt::cuda::decode_num_splits(
            a.max_seq_len,
            drt::cuda::decode_ctas_per_split<T, HEAD_DIM, BLOCK_SIZE>(a.batch, p.num_heads,
                                                                      p.num_kv_heads),
            decode_fill_ctas<T, HEAD_DIM, BLOCK_SIZE>(guard.device(), mma));
        set_workspace(p, a);
        return drt::cuda::launch_decode_attention<T, HEAD_DIM, BLOCK_SIZE>(p, cuda_stream);
      });
    });
  });
  check_cuda(err, "decode_attention kernel launch");
}

}  // namespace drt::cuda_ops

// Prefill attention (FlashAttention-2 style): causal, varlen, GQA, optional paged prefix,
// optional fused write of the new K/V into the paged pool.
//
// For sequence i, new tokens are rows cu_seqlens[i] .. cu_seqlens[i + 1] at positions
// prefix + j; they attend to the cached prefix (positions < prefix, read through the block
// table) and causally to each other (read from key/value). Rows of an M tile are packed
// (token, head-in-group) pairs, so one K/V tile serves every query head of a KV head.
//   fp16/bf16: tensor cores (prefill_mma.cuh; 128-row M tiles unless every sequence fits
//   64 rows), fp32: CUDA cores (prefill_simt.cuh).
// Bad ids never reach memory outside the buffers: cu_seqlens are clamped to
// [0, num_tokens], bad block ids read as NaN rows, a prefix_lens entry out of range gives
// NaN output rows, and slots out of range are not written.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/prefill_mma.cuh"
#include "distserve_rt/cuda/prefill_simt.cuh"
#include "distserve_rt/cuda/prefill_tiles.cuh"

namespace drt::cuda {
namespace prefill_simt_detail {

// The fp32 counterpart of prefill_mma_detail::attend_m_tile (same pipeline and barriers).
template <int HEAD_DIM>
__device__ __forceinline__ void attend_m_tile(uint4* q_tile, uint4* k_tile, uint4* v_tile,
                                              float* p_smem, const PrefillParams& p,
                                              const PrefillSeq& s, int seq, int kv_head, int m0,
                                              bool writer) {
  using Cfg = PrefillSimtConfig<HEAD_DIM>;
  constexpr int kN = Cfg::kBlockN;
  constexpr int kThreads = Cfg::kThreads;
  int row_pos[2];  // query positions of rows 2rg, 2rg + 1
  for (int r = 0; r < 2; ++r)
    row_pos[r] = s.prefix + p.group_div.div(m0 + 2 * (threadIdx.x / 8) + r);
  const int last_token = min(s.num_q - 1, p.group_div.div(m0 + Cfg::kBlockM - 1));
  const int kv_len = s.prefix + s.num_q;
  const int num_n_tiles = (s.prefix + last_token + 1 + kN - 1) / kN;

  load_q_tile<float, HEAD_DIM, Cfg::kBlockM, kThreads>(q_tile, p, s, kv_head, m0);
  load_kv_tile<float, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, seq, kv_head, 0);
  cp_async_commit();
  SimtRows<HEAD_DIM> st;
  for (int r = 0; r < 2; ++r) {
    st.m[r] = -INFINITY;
    st.l[r] = 0.f;
    for (int i = 0; i < HEAD_DIM / 32; ++i) st.o[r][i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int nt = 0; nt < num_n_tiles; ++nt) {
    const int n0 = nt * kN;
    cp_async_wait<0>();
    __syncthreads();  // K(nt) (and Q) landed; every thread is done with V(nt - 1) and P
    if (writer) write_new_kv_rows<float, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, kv_head, n0);
    load_kv_tile<float, HEAD_DIM, kN, kThreads>(v_tile, 1, p, s, seq, kv_head, n0);
    cp_async_commit();
    scores_to_p<HEAD_DIM>(st, q_tile, k_tile, p_smem, row_pos, n0, kv_len, p.scale_log2);
    cp_async_wait<0>();
    __syncthreads();  // V(nt) landed and P is visible; every thread is done with K(nt)
    if (writer) write_new_kv_rows<float, HEAD_DIM, kN, kThreads>(v_tile, 1, p, s, kv_head, n0);
    if (nt + 1 < num_n_tiles) {
      load_kv_tile<float, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, seq, kv_head, n0 + kN);
    }
    cp_async_commit();
    accumulate_pv<HEAD_DIM>(st, p_smem, v_tile);
  }
  store_rows<HEAD_DIM>(st, p, s, kv_head, m0);
  __syncthreads();  // the next M tile refills the tiles
}

}  // namespace prefill_simt_detail

template <int HEAD_DIM>
__global__ void __launch_bounds__(128) prefill_simt_kernel(const PrefillParams p) {
  using Cfg = PrefillSimtConfig<HEAD_DIM>;
  extern __shared__ uint4 smem[];  // Q, K, V tiles [32, HEAD_DIM] (padded rows), then P
  uint4* q_tile = smem;
  uint4* k_tile = smem + Cfg::kTileWords;
  uint4* v_tile = smem + 2 * Cfg::kTileWords;
  float* p_smem = reinterpret_cast<float*>(smem + 3 * Cfg::kTileWords);  // [32, kPStride]
  const int seq = blockIdx.z;
  const int kv_head = blockIdx.y;
  const PrefillSeq s = prefill_seq(p, seq);
  const int64_t num_rows = static_cast<int64_t>(s.num_q) * p.group;
  const int num_m_tiles = static_cast<int>((num_rows + Cfg::kBlockM - 1) / Cfg::kBlockM);
  for (int mt = blockIdx.x; mt < num_m_tiles; mt += gridDim.x) {
    const int m0 = mt * Cfg::kBlockM;
    if (s.bad) {
      store_nan_rows<float, HEAD_DIM, Cfg::kBlockM, Cfg::kThreads>(p, s, kv_head, m0);
      continue;
    }
    const bool writer = p.slot_mapping != nullptr && mt == num_m_tiles - 1;
    prefill_simt_detail::attend_m_tile<HEAD_DIM>(q_tile, k_tile, v_tile, p_smem, p, s, seq, kv_head,
                                                 m0, writer);
  }
}

// Packed rows (max_seqlen_q x group) above which fp16/bf16 run 128-row M tiles (32 rows a
// warp, twice the reuse of each K/V fragment). At or below it a sequence fits one 64-row
// tile: a 128-row tile would compute at least half its rows as padding, and twice the CTAs
// fill more of the GPU for the short prefills of chunked or mixed batches.
inline constexpr int64_t kPrefillWideTileMinRows = 64;

// Grid x: M-tile slots for the longest sequence (the CTAs stride past it), at least 1.
inline int64_t prefill_grid_x(int64_t max_seqlen_q, int group, int block_m) {
  constexpr int64_t kMaxGridX = 1 << 16;
  const int64_t grid_x = (max_seqlen_q * group + block_m - 1) / block_m;
  return grid_x < 1 ? 1 : (grid_x > kMaxGridX ? kMaxGridX : grid_x);
}

// Above 48 KiB a kernel must opt in to its dynamic shared memory (per device, cheap).
inline cudaError_t allow_dynamic_smem(const void* kernel, int smem_bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

template <typename T, int HEAD_DIM, int kRowTiles>
cudaError_t launch_prefill_mma(const PrefillParams& p, int64_t max_seqlen_q, cudaStream_t stream) {
  using Cfg = PrefillMmaConfig<T, HEAD_DIM, kRowTiles>;
  const dim3 grid(static_cast<unsigned>(prefill_grid_x(max_seqlen_q, p.group, Cfg::kBlockM)),
                  p.num_kv_heads, p.batch);
  const cudaError_t err = allow_dynamic_smem(
      reinterpret_cast<const void*>(&prefill_mma_kernel<T, HEAD_DIM, kRowTiles>), Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  prefill_mma_kernel<T, HEAD_DIM, kRowTiles><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <int HEAD_DIM>
cudaError_t launch_prefill_simt(const PrefillParams& p, int64_t max_seqlen_q, cudaStream_t stream) {
  using Cfg = PrefillSimtConfig<HEAD_DIM>;
  const dim3 grid(static_cast<unsigned>(prefill_grid_x(max_seqlen_q, p.group, Cfg::kBlockM)),
                  p.num_kv_heads, p.batch);
  const cudaError_t err = allow_dynamic_smem(
      reinterpret_cast<const void*>(&prefill_simt_kernel<HEAD_DIM>), Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  prefill_simt_kernel<HEAD_DIM><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Launches the kernel for T (tensor cores for fp16/bf16, CUDA cores for fp32).
// max_seqlen_q sizes the grid and picks the M tile; longer sequences are still covered
// (the CTAs stride).
template <typename T, int HEAD_DIM>
cudaError_t launch_prefill_attention(const PrefillParams& p, int64_t max_seqlen_q,
                                     cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return launch_prefill_simt<HEAD_DIM>(p, max_seqlen_q, stream);
  } else {
    if (max_seqlen_q * p.group > kPrefillWideTileMinRows) {
      return launch_prefill_mma<T, HEAD_DIM, 2>(p, max_seqlen_q, stream);
    }
    return launch_prefill_mma<T, HEAD_DIM, 1>(p, max_seqlen_q, stream);
  }
}

}  // namespace drt::cuda

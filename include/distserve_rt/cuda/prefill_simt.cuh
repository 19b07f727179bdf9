// fp32 prefill attention on CUDA cores: the same tiling, pipeline and masking as the
// tensor-core kernel (prefill_mma.cuh), with 32x32 tiles and fp32 FMAs so that fp32 inputs
// keep fp32 accuracy (tensor-core tf32 would not).
//
// Thread (rg, cg) of 128: rg = tid / 8 owns rows 2rg, 2rg + 1 of the M tile; cg = tid % 8
// owns S columns cg + 8c and output words (4 dims) cg + 8i, so the 8 lanes of a row read 8
// different bank groups and the 4 row groups of a warp share addresses (broadcast).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/fast_math.cuh"
#include "distserve_rt/cuda/prefill_tiles.cuh"

namespace drt::cuda {

template <int HEAD_DIM>
struct PrefillSimtConfig {
  static constexpr int kThreads = 128;
  static constexpr int kBlockM = 32;
  static constexpr int kBlockN = 32;
  static constexpr int kWordsPerLane = HEAD_DIM / 32;  // output float4s per row per thread
  using Shape = TileShape<float, HEAD_DIM>;
  static constexpr int kTileWords = kBlockM * Shape::kStride;
  static constexpr int kPStride = kBlockN + 1;  // P rows padded against bank conflicts
  static constexpr int kSmemBytes = 3 * kTileWords * 16 + kBlockM * kPStride * 4;
};

namespace prefill_simt_detail {

template <int HEAD_DIM>
struct SimtRows {
  float4 o[2][HEAD_DIM / 32];  // rows 2rg, 2rg + 1; words cg + 8i
  float m[2];
  float l[2];  // this thread's part of the running sum (reduced over cg at the end)
};

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

__device__ __forceinline__ float max_over_cg(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

// S = Q K^T for the thread's 2 x 4 scores, masked, then online softmax: P goes to p_smem.
template <int HEAD_DIM>
__device__ __forceinline__ void scores_to_p(SimtRows<HEAD_DIM>& st, const uint4* q_tile,
                                            const uint4* k_tile, float* p_smem,
                                            const int (&row_pos)[2], int n0, int kv_len,
                                            float scale_log2) {
  using Cfg = PrefillSimtConfig<HEAD_DIM>;
  constexpr int kStride = Cfg::Shape::kStride;
  const int rg = threadIdx.x / 8;
  const int cg = threadIdx.x % 8;
  float s[2][4] = {};
  for (int w = 0; w < HEAD_DIM / 4; ++w) {
    const float4 q0 = reinterpret_cast<const float4*>(q_tile)[(2 * rg) * kStride + w];
    const float4 q1 = reinterpret_cast<const float4*>(q_tile)[(2 * rg + 1) * kStride + w];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float4 k = reinterpret_cast<const float4*>(k_tile)[(cg + 8 * c) * kStride + w];
      s[0][c] = dot4(q0, k, s[0][c]);
      s[1][c] = dot4(q1, k, s[1][c]);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float row_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = n0 + cg + 8 * c;
      s[r][c] = key > row_pos[r] || key >= kv_len ? -INFINITY : s[r][c] * scale_log2;
      row_max = fmaxf(row_max, s[r][c]);
    }
    const float m_new = fmaxf(st.m[r], max_over_cg(row_max));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked row so far
    const float alpha = fast_exp2(st.m[r] - m_use);
    st.l[r] *= alpha;
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 32; ++i) {
      st.o[r][i].x *= alpha;
      st.o[r][i].y *= alpha;
      st.o[r][i].z *= alpha;
      st.o[r][i].w *= alpha;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float prob = fast_exp2(s[r][c] - m_use);
      st.l[r] += prob;
      p_smem[(2 * rg + r) * Cfg::kPStride + cg + 8 * c] = prob;
    }
    st.m[r] = m_new;
  }
}

template <int HEAD_DIM>
__device__ __forceinline__ void accumulate_pv(SimtRows<HEAD_DIM>& st, const float* p_smem,
                                              const uint4* v_tile) {
  using Cfg = PrefillSimtConfig<HEAD_DIM>;
  const int rg = threadIdx.x / 8;
  const int cg = threadIdx.x % 8;
  for (int key = 0; key < Cfg::kBlockN; ++key) {
    const float p0 = p_smem[(2 * rg) * Cfg::kPStride + key];
    const float p1 = p_smem[(2 * rg + 1) * Cfg::kPStride + key];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 32; ++i) {
      const float4 v =
          reinterpret_cast<const float4*>(v_tile)[key * Cfg::Shape::kStride + cg + 8 * i];
      st.o[0][i] = make_float4(fmaf(p0, v.x, st.o[0][i].x), fmaf(p0, v.y, st.o[0][i].y),
                               fmaf(p0, v.z, st.o[0][i].z), fmaf(p0, v.w, st.o[0][i].w));
      st.o[1][i] = make_float4(fmaf(p1, v.x, st.o[1][i].x), fmaf(p1, v.y, st.o[1][i].y),
                               fmaf(p1, v.z, st.o[1][i].z), fmaf(p1, v.w, st.o[1][i].w));
    }
  }
}

template <int HEAD_DIM>
__device__ __forceinline__ void store_rows(SimtRows<HEAD_DIM>& st, const PrefillParams& p,
                                           const PrefillSeq& s, int kv_head, int m0) {
  const int rg = threadIdx.x / 8;
  const int cg = threadIdx.x % 8;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l += __shfl_xor_sync(0xffffffffu, l, 4);
    const int packed = m0 + 2 * rg + r;
    const int token = p.group_div.div(packed);
    if (token >= s.num_q) continue;
    const int head = kv_head * p.group + p.group_div.mod(packed, token);
    float4* row =
        reinterpret_cast<float4*>(static_cast<float*>(p.out) + (s.q_start + token) * p.out_stride +
                                  static_cast<int64_t>(head) * HEAD_DIM);
    const float inv_l = fast_rcp(l);
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 32; ++i) {
      const float4 o = st.o[r][i];
      row[cg + 8 * i] = make_float4(o.x * inv_l, o.y * inv_l, o.z * inv_l, o.w * inv_l);
    }
  }
}

}  // namespace prefill_simt_detail
}  // namespace drt::cuda

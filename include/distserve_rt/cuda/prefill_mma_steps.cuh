// Warp-level steps of the tensor-core prefill kernel (prefill_mma.cuh has the kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/fast_math.cuh"
#include "distserve_rt/cuda/mma.cuh"
#include "distserve_rt/cuda/prefill_tiles.cuh"

namespace drt::cuda {

template <typename T, int HEAD_DIM>
struct PrefillMmaConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * 16;
  static constexpr int kBlockN = 64;
  using Shape = TileShape<T, HEAD_DIM>;
  static constexpr int kTileWords = kBlockM * Shape::kStride;  // Q, K and V tiles alike
  static constexpr int kSmemBytes = 3 * kTileWords * 16;
  static_assert(kBlockM == kBlockN, "Q, K and V tiles share one shape");
};

namespace prefill_mma_detail {

// Per-thread state of its warp's 16 rows: this thread holds rows `group` and `group + 8`.
template <int HEAD_DIM>
struct MmaRows {
  float o[HEAD_DIM / 8][4];  // O accumulators, n-tiles of 8 dims (C fragment layout)
  float m[2];                // running max (log2 domain) of rows group, group + 8
  float l[2];                // this thread's part of the running sum (quad-reduced at the end)
};

// S = Q K^T for the warp's 16 rows and the tile's 64 keys.
template <typename T, int HEAD_DIM, int kBlockN>
__device__ __forceinline__ void qk_tile(float (&s)[kBlockN / 8][4],
                                        const uint32_t (&qf)[HEAD_DIM / 16][4],
                                        const uint4* k_tile) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;  // which 8x8 matrix this lane addresses
#pragma unroll
  for (int t = 0; t < kBlockN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < kBlockN / 16; ++nn) {
      // Matrices: (keys +0, dims +0), (keys +0, dims +8), (keys +8, dims +0), (keys +8, +8).
      const int key = nn * 16 + (mat >> 1) * 8 + (lane & 7);
      uint32_t b[4];
      ldmatrix_x4(b, k_tile + key * kStride + kk * 2 + (mat & 1));
      mma_16816<T>(s[2 * nn], qf[kk], b[0], b[1]);
      mma_16816<T>(s[2 * nn + 1], qf[kk], b[2], b[3]);
    }
  }
}

// Causal mask + online softmax on S (in place: S becomes P), rescaling O and l.
// row_pos[h]: query position of row group + 8h; keys at positions > row_pos or >= kv_len
// are masked. kMasked = false: the caller knows no key of the tile is (see attend_m_tile).
template <int HEAD_DIM, int kBlockN, bool kMasked>
__device__ __forceinline__ void softmax_tile(float (&s)[kBlockN / 8][4], MmaRows<HEAD_DIM>& st,
                                             const int (&row_pos)[2], int n0, int kv_len,
                                             float scale_log2) {
  const int quad = threadIdx.x % 4;
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int t = 0; t < kBlockN / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = n0 + t * 8 + 2 * quad + (e & 1);
      const bool masked = kMasked && (key > row_pos[e / 2] || key >= kv_len);
      s[t][e] = masked ? -INFINITY : s[t][e] * scale_log2;
      row_max[e / 2] = fmaxf(row_max[e / 2], s[t][e]);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // The four lanes of a quad hold the same two rows.
    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 1));
    row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 2));
    const float m_new = fmaxf(st.m[h], row_max[h]);
    // A row with every key masked so far keeps max -inf; exp2 of (-inf) - 0 is then 0.
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = fast_exp2(st.m[h] - m_use);
    st.l[h] *= alpha;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      st.o[d][2 * h] *= alpha;
      st.o[d][2 * h + 1] *= alpha;
    }
    row_max[h] = m_use;
    st.m[h] = m_new;
  }
#pragma unroll
  for (int t = 0; t < kBlockN / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[t][e] = fast_exp2(s[t][e] - row_max[e / 2]);
      st.l[e / 2] += s[t][e];
    }
  }
}

// O += P V: P (fp32 C fragments of S) is packed to T as A fragments, V via ldmatrix.trans.
template <typename T, int HEAD_DIM, int kBlockN>
__device__ __forceinline__ void pv_tile(MmaRows<HEAD_DIM>& st, const float (&p)[kBlockN / 8][4],
                                        const uint4* v_tile) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    const uint32_t a[4] = {
        pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
        pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
      // Matrices: (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +8), (keys +8, +8).
      const int key = kk * 16 + (mat & 1) * 8 + (lane & 7);
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + key * kStride + dd * 2 + (mat >> 1));
      mma_16816<T>(st.o[2 * dd], a, b[0], b[1]);
      mma_16816<T>(st.o[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// Q A-fragments of the warp's 16 rows from the Q tile.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[HEAD_DIM / 16][4],
                                                 const uint4* q_tile) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;
  // Matrices: (rows +0, dims +0), (rows +8, dims +0), (rows +0, dims +8), (rows +8, +8).
  const int row = (threadIdx.x / 32) * 16 + (mat & 1) * 8 + (lane & 7);
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    ldmatrix_x4(qf[kk], q_tile + row * kStride + kk * 2 + (mat >> 1));
  }
}

// Normalises O and stores this thread's two rows (pairs of dims per n-tile).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_o_rows(MmaRows<HEAD_DIM>& st, const PrefillParams& p,
                                             const PrefillSeq& s, int kv_head, int m0) {
  const int lane = threadIdx.x % 32;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = st.l[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int packed = m0 + (threadIdx.x / 32) * 16 + lane / 4 + 8 * h;
    const int token = p.group_div.div(packed);
    if (token >= s.num_q) continue;
    const int head = kv_head * p.group + p.group_div.mod(packed, token);
    T* row = out + (s.q_start + token) * p.out_stride + static_cast<int64_t>(head) * HEAD_DIM;
    const float inv_l = fast_rcp(l);
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      *reinterpret_cast<uint32_t*>(row + d * 8 + 2 * (lane % 4)) =
          pack2<T>(st.o[d][2 * h] * inv_l, st.o[d][2 * h + 1] * inv_l);
    }
  }
}

}  // namespace prefill_mma_detail
}  // namespace drt::cuda

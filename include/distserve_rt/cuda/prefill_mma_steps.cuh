// Warp-level steps of the tensor-core prefill kernel (prefill_mma.cuh has the kernel).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/fast_math.cuh"
#include "distserve_rt/cuda/mma.cuh"
#include "distserve_rt/cuda/prefill_tiles.cuh"

namespace drt::cuda {

// kRowTiles: m16 row tiles per warp. 1: 16 rows a warp, 64-row M tiles (short sequences
// waste fewer rows). 2: 32 rows a warp, 128-row M tiles as FA2 runs head_dim 128: each K/V
// fragment loaded by ldmatrix feeds two mma instead of one, at twice the O accumulators.
template <typename T, int HEAD_DIM, int kRowTiles = 1>
struct PrefillMmaConfig {
  static_assert(kRowTiles == 1 || kRowTiles == 2, "16 or 32 query rows per warp");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kRowTiles;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  static constexpr int kBlockN = 64;
  // Q's A fragments stay in registers for the key loop unless that would not fit: at
  // head_dim 128 with two row tiles they are 64 registers beside 128 of O and 64 of S, so
  // they are reloaded from the Q tile (which stays in shared memory) per key tile, as FA2.
  static constexpr bool kQInRegs = kRowTiles * HEAD_DIM <= 128;
  using Shape = TileShape<T, HEAD_DIM>;
  static constexpr int kQTileWords = kBlockM * Shape::kStride;
  static constexpr int kKvTileWords = kBlockN * Shape::kStride;  // K and V tiles alike
  static constexpr int kSmemBytes = (kQTileWords + 2 * kKvTileWords) * 16;
};

namespace prefill_mma_detail {

// Per-thread state of its warp's 16 rows: this thread holds rows `group` and `group + 8`.
template <int HEAD_DIM>
struct MmaRows {
  float o[HEAD_DIM / 8][4];  // O accumulators, n-tiles of 8 dims (C fragment layout)
  float m[2];                // running max (log2 domain) of rows group, group + 8
  float l[2];                // this thread's part of the running sum (quad-reduced at the end)
};

// Q A-fragments (k-step kk) of the 16 rows from `row0` of the Q tile.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void load_q_fragment(uint32_t (&a)[4], const uint4* q_tile, int row0,
                                                int kk) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;
  // Matrices: (rows +0, dims +0), (rows +8, dims +0), (rows +0, dims +8), (rows +8, +8).
  const int row = row0 + (mat & 1) * 8 + (lane & 7);
  ldmatrix_x4(a, q_tile + row * kStride + kk * 2 + (mat >> 1));
}

// Q fragments of the warp's row tiles, kept in registers (Cfg::kQInRegs) for the key loop.
template <typename T, int HEAD_DIM, int kRowTiles>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[kRowTiles][HEAD_DIM / 16][4],
                                                 const uint4* q_tile, int warp_row0) {
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      load_q_fragment<T, HEAD_DIM>(qf[r][kk], q_tile, warp_row0 + 16 * r, kk);
    }
  }
}

// S = Q K^T for the warp's row tiles and the tile's 64 keys: each K fragment serves every
// row tile. Q comes from `qf` (kQInRegs) or is reloaded from the Q tile per k-step.
template <typename T, int HEAD_DIM, int kBlockN, int kRowTiles, bool kQInRegs>
__device__ __forceinline__ void qk_tile(float (&s)[kRowTiles][kBlockN / 8][4],
                                        const uint32_t (&qf)[kRowTiles][HEAD_DIM / 16][4],
                                        const uint4* q_tile, int warp_row0, const uint4* k_tile) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;  // which 8x8 matrix this lane addresses
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
    for (int t = 0; t < kBlockN / 8; ++t) s[r][t][0] = s[r][t][1] = s[r][t][2] = s[r][t][3] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    uint32_t a[kRowTiles][4];
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      if constexpr (kQInRegs) {
        for (int i = 0; i < 4; ++i) a[r][i] = qf[r][kk][i];
      } else {
        load_q_fragment<T, HEAD_DIM>(a[r], q_tile, warp_row0 + 16 * r, kk);
      }
    }
#pragma unroll
    for (int nn = 0; nn < kBlockN / 16; ++nn) {
      // Matrices: (keys +0, dims +0), (keys +0, dims +8), (keys +8, dims +0), (keys +8, +8).
      const int key = nn * 16 + (mat >> 1) * 8 + (lane & 7);
      uint32_t b[4];
      ldmatrix_x4(b, k_tile + key * kStride + kk * 2 + (mat & 1));
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        mma_16816<T>(s[r][2 * nn], a[r], b[0], b[1]);
        mma_16816<T>(s[r][2 * nn + 1], a[r], b[2], b[3]);
      }
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

// O += P V: P (fp32 C fragments of S) is packed to T as A fragments, V via ldmatrix.trans;
// each V fragment serves every row tile.
template <typename T, int HEAD_DIM, int kBlockN, int kRowTiles>
__device__ __forceinline__ void pv_tile(MmaRows<HEAD_DIM> (&st)[kRowTiles],
                                        const float (&p)[kRowTiles][kBlockN / 8][4],
                                        const uint4* v_tile) {
  constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  const int lane = threadIdx.x % 32;
  const int mat = lane / 8;
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    uint32_t a[kRowTiles][4];
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      a[r][0] = pack2<T>(p[r][2 * kk][0], p[r][2 * kk][1]);
      a[r][1] = pack2<T>(p[r][2 * kk][2], p[r][2 * kk][3]);
      a[r][2] = pack2<T>(p[r][2 * kk + 1][0], p[r][2 * kk + 1][1]);
      a[r][3] = pack2<T>(p[r][2 * kk + 1][2], p[r][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
      // Matrices: (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +8), (keys +8, +8).
      const int key = kk * 16 + (mat & 1) * 8 + (lane & 7);
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + key * kStride + dd * 2 + (mat >> 1));
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        mma_16816<T>(st[r].o[2 * dd], a[r], b[0], b[1]);
        mma_16816<T>(st[r].o[2 * dd + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// Normalises O and stores this thread's two rows of the 16 from packed row `row0`.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_o_rows(MmaRows<HEAD_DIM>& st, const PrefillParams& p,
                                             const PrefillSeq& s, int kv_head, int row0) {
  const int lane = threadIdx.x % 32;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = st.l[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int packed = row0 + lane / 4 + 8 * h;
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

// Tensor-core prefill attention for fp16/bf16 (FlashAttention-2 forward, mma.sync m16n8k16).
//
// Grid (M-tile slot, kv_head, seq). A CTA (4 warps) runs 64- or 128-row M tiles of packed
// (token, head) rows of one KV head, striding over the sequence's tiles, so the grid's
// x size (from max_seqlen_q) only sizes the launch and never limits what is computed.
// Each warp owns 16 or 32 rows (kRowTiles, see PrefillMmaConfig): Q fragments stay in
// registers for the whole key loop where they fit, S = Q K^T and O += P V run on tensor
// cores with fp32 accumulators, and P goes from the S accumulators straight into A
// fragments. K and V tiles (64 keys) alternate in shared
// memory: V(n) loads while S(n) is computed, K(n + 1) while O += P V(n) runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/prefill_mma_steps.cuh"
#include "distserve_rt/cuda/prefill_tiles.cuh"

namespace drt::cuda {
namespace prefill_mma_detail {

// One M tile: packed rows m0 .. m0 + kBlockM against keys 0 .. (its last query position).
// `writer`: this CTA also writes the new tokens' K/V into the pool (fused write_kv).
template <typename T, int HEAD_DIM, int kRowTiles>
__device__ __forceinline__ void attend_m_tile(uint4* q_tile, uint4* k_tile, uint4* v_tile,
                                              const PrefillParams& p, const PrefillSeq& s, int seq,
                                              int kv_head, int m0, bool writer) {
  using Cfg = PrefillMmaConfig<T, HEAD_DIM, kRowTiles>;
  constexpr int kN = Cfg::kBlockN;
  constexpr int kThreads = Cfg::kThreads;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = (threadIdx.x / 32) * Cfg::kRowsPerWarp;  // in the M tile
  int row_pos[kRowTiles][2];  // query positions of this thread's rows (group, group + 8)
  for (int r = 0; r < kRowTiles; ++r) {
    for (int h = 0; h < 2; ++h) {
      row_pos[r][h] = s.prefix + p.group_div.div(m0 + warp_row0 + 16 * r + lane / 4 + 8 * h);
    }
  }
  const int last_token = min(s.num_q - 1, p.group_div.div(m0 + Cfg::kBlockM - 1));
  const int kv_len = s.prefix + s.num_q;
  const int num_n_tiles = (s.prefix + last_token + 1 + kN - 1) / kN;
  // Key tiles that end at or before this warp's first query position (and inside the
  // sequence) need no mask for any of its rows: the softmax branches once per tile, warp-
  // uniformly, to a mask-free body; only the diagonal and the ragged last tiles pay for it.
  const int warp_first_pos = s.prefix + p.group_div.div(m0 + warp_row0);
  const int unmasked_end = min(warp_first_pos + 1, kv_len);

  load_q_tile<T, HEAD_DIM, Cfg::kBlockM, kThreads>(q_tile, p, s, kv_head, m0);
  load_kv_tile<T, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, seq, kv_head, 0);
  cp_async_commit();
  uint32_t qf[kRowTiles][HEAD_DIM / 16][4];  // used only when Cfg::kQInRegs
  MmaRows<HEAD_DIM> st[kRowTiles];
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
    st[r].m[0] = st[r].m[1] = -INFINITY;
    st[r].l[0] = st[r].l[1] = 0.f;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      st[r].o[d][0] = st[r].o[d][1] = st[r].o[d][2] = st[r].o[d][3] = 0.f;
    }
  }

  for (int nt = 0; nt < num_n_tiles; ++nt) {
    const int n0 = nt * kN;
    cp_async_wait<0>();
    __syncthreads();  // K(nt) (and Q) landed; every warp is done with V(nt - 1)
    if constexpr (Cfg::kQInRegs) {
      if (nt == 0) load_q_fragments<T, HEAD_DIM, kRowTiles>(qf, q_tile, warp_row0);
    }
    if (writer) write_new_kv_rows<T, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, kv_head, n0);
    load_kv_tile<T, HEAD_DIM, kN, kThreads>(v_tile, 1, p, s, seq, kv_head, n0);
    cp_async_commit();
    float sp[kRowTiles][kN / 8][4];  // S, then P in place
    qk_tile<T, HEAD_DIM, kN, kRowTiles, Cfg::kQInRegs>(sp, qf, q_tile, warp_row0, k_tile);
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
      if (n0 + kN <= unmasked_end) {
        softmax_tile<HEAD_DIM, kN, false>(sp[r], st[r], row_pos[r], n0, kv_len, p.scale_log2);
      } else {
        softmax_tile<HEAD_DIM, kN, true>(sp[r], st[r], row_pos[r], n0, kv_len, p.scale_log2);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V(nt) landed; every warp is done with K(nt)
    if (writer) write_new_kv_rows<T, HEAD_DIM, kN, kThreads>(v_tile, 1, p, s, kv_head, n0);
    if (nt + 1 < num_n_tiles) {
      load_kv_tile<T, HEAD_DIM, kN, kThreads>(k_tile, 0, p, s, seq, kv_head, n0 + kN);
    }
    cp_async_commit();
    pv_tile<T, HEAD_DIM, kN, kRowTiles>(st, sp, v_tile);
  }
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
    store_o_rows<T, HEAD_DIM>(st[r], p, s, kv_head, m0 + warp_row0 + 16 * r);
  }
  __syncthreads();  // the next M tile refills the tiles
}

}  // namespace prefill_mma_detail

template <typename T, int HEAD_DIM, int kRowTiles>
__global__ void __launch_bounds__(128) prefill_mma_kernel(const PrefillParams p) {
  using Cfg = PrefillMmaConfig<T, HEAD_DIM, kRowTiles>;
  extern __shared__ uint4 smem[];  // Q tile [kBlockM, HEAD_DIM], K, V tiles [kBlockN, HEAD_DIM]
  uint4* q_tile = smem;
  uint4* k_tile = smem + Cfg::kQTileWords;
  uint4* v_tile = k_tile + Cfg::kKvTileWords;
  const int seq = blockIdx.z;
  const int kv_head = blockIdx.y;
  const PrefillSeq s = prefill_seq(p, seq);
  const int64_t num_rows = static_cast<int64_t>(s.num_q) * p.group;
  const int num_m_tiles = static_cast<int>((num_rows + Cfg::kBlockM - 1) / Cfg::kBlockM);
  for (int mt = blockIdx.x; mt < num_m_tiles; mt += gridDim.x) {
    const int m0 = mt * Cfg::kBlockM;
    if (s.bad) {
      store_nan_rows<T, HEAD_DIM, Cfg::kBlockM, Cfg::kThreads>(p, s, kv_head, m0);
      continue;
    }
    const bool writer = p.slot_mapping != nullptr && mt == num_m_tiles - 1;
    prefill_mma_detail::attend_m_tile<T, HEAD_DIM, kRowTiles>(q_tile, k_tile, v_tile, p, s, seq,
                                                              kv_head, m0, writer);
  }
}

}  // namespace drt::cuda

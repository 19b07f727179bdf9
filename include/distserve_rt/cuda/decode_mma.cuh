// Tensor-core decode attention for fp16/bf16 and GQA groups >= 4 (as FlashInfer routes them).
//
// The SIMT split kernel (decode_attention.cuh) does each (query head, token) dot product on
// CUDA cores, so for a group of g heads it issues g times the FMAs and shuffles per K/V byte
// it reads: from g = 4 up it is issue-bound, not bandwidth-bound. Here the group's query
// heads are the M rows of mma.sync m16n8k16 (padded to 16; larger groups are tiled as in the
// SIMT kernel): S = Q K^T with K from shared memory as the B operand (ldmatrix), then O += P V
// with P packed from the S accumulators and V via ldmatrix.trans, the steps of the prefill
// tensor-core kernel (prefill_mma_steps.cuh) on 16-key slices.
//
// Grid, splits and workspace are the SIMT kernel's, so decode_merge_kernel combines the
// splits unchanged. A CTA (4 warps) streams 64-token K and V tiles through shared memory
// (cp.async, K(t + 1) loading while O += P V(t) runs, V(t) while S(t) is computed); each
// warp takes 16 tokens of every tile with its own online softmax (fp32, log2 domain), and
// the four warps' states are combined at the end. Bad inputs give NaN as in the SIMT kernel.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/decode_params.cuh"
#include "distserve_rt/cuda/dtype.cuh"
#include "distserve_rt/cuda/fast_math.cuh"
#include "distserve_rt/cuda/prefill_mma_steps.cuh"

namespace drt::cuda {

template <typename T, int HEAD_DIM>
struct DecodeMmaConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;        // query heads per CTA: the mma's M
  static constexpr int kWarpTokens = 16;  // keys per warp and tile: the K of O += P V
  static constexpr int kTileTokens = kWarps * kWarpTokens;
  static constexpr int kVec = kVecElems<T>;
  static constexpr int kVecsPerRow = HEAD_DIM / kVec;
  // One padding word per row: the 8 rows an ldmatrix reads fall in different banks.
  static constexpr int kStride = TileShape<T, HEAD_DIM>::kStride;
  static constexpr int kTileWords = kTileTokens * kStride;
  // After the key loop the tiles hold the warps' states: [kWarps][kRows][HEAD_DIM] outputs,
  // then [kWarps][kRows] (max, sum).
  static constexpr int kMergeBytes = kWarps * kRows * (HEAD_DIM * 4 + 8);
  static constexpr int kTileBytes = 2 * kTileWords * 16;
  static constexpr int kSmemBytes = kTileBytes > kMergeBytes ? kTileBytes : kMergeBytes;
  static_assert(kSmemBytes <= 48 * 1024, "no opt-in shared memory: launches as it is");
};

namespace decode_mma_detail {

// The (seq, kv head, split, head tile) of this CTA.
struct MmaWork {
  int seq;
  int kv_head;
  int split;
  int head0;          // first query head of the CTA
  int num_cta_heads;  // valid M rows (the rest are zero padding)
};

__device__ __forceinline__ MmaWork mma_work(const DecodeParams& p) {
  MmaWork w;
  w.seq = blockIdx.z;
  w.kv_head = blockIdx.y / p.num_head_tiles;
  w.split = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int head_begin = (blockIdx.y % p.num_head_tiles) * p.heads_per_cta;
  w.num_cta_heads = min(p.heads_per_cta, group - head_begin);
  w.head0 = w.kv_head * group + head_begin;
  return w;
}

// cp.async of tokens [tile_start, tile_start + kTileTokens) of K (part 0) or V (part 1) into
// `tile` ([kTileTokens, kStride] words): rows past `end` zero-filled, rows whose block id is
// out of range NaN.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void load_tile(uint4* tile, int part, const DecodeParams& p,
                                          const MmaWork& w, int tile_start, int end) {
  using Cfg = DecodeMmaConfig<T, HEAD_DIM>;
  const T* kv_cache = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_table + static_cast<int64_t>(w.seq) * p.max_blocks_per_seq;
  // [num_blocks, 2, num_kv_heads, BLOCK_SIZE, HEAD_DIM]: V of a block follows its K.
  const int64_t part_offset =
      static_cast<int64_t>(part * p.num_kv_heads + w.kv_head) * BLOCK_SIZE * HEAD_DIM;
  for (int i = threadIdx.x; i < Cfg::kTileTokens * Cfg::kVecsPerRow; i += Cfg::kThreads) {
    const int tok = i / Cfg::kVecsPerRow;
    const int vec = i % Cfg::kVecsPerRow;
    const int pos = tile_start + tok;
    uint4* dst = tile + tok * Cfg::kStride + vec;
    const T* src = kv_cache;  // any valid address: not read when the copy is predicated off
    bool valid = false;
    if (pos < end) {
      const int32_t block = block_table[pos / BLOCK_SIZE];
      if (block < 0 || block >= p.num_blocks) {
        *dst = nan_vec<T>();
        continue;
      }
      src = kv_cache + block * p.kv_block_stride + part_offset + (pos % BLOCK_SIZE) * HEAD_DIM +
            vec * Cfg::kVec;
      valid = true;
    }
    cp_async_16(dst, src, valid);
  }
}

// Q A-fragments of the CTA's heads straight from global memory (read once per CTA): lane
// (group g, quad q) holds rows g and g + 8, dims 2q, 2q + 1 and 2q + 8, 2q + 9 of each
// 16-dim slice (mma.cuh's A layout); rows past num_cta_heads are the zero padding.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[HEAD_DIM / 16][4],
                                                 const DecodeParams& p, const MmaWork& w) {
  const int lane = threadIdx.x % 32;
  const T* query = static_cast<const T*>(p.query) + w.seq * p.query_stride +
                   static_cast<int64_t>(w.head0) * HEAD_DIM;
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = lane / 4 + 8 * (r & 1);
      const int dim = kk * 16 + 2 * (lane % 4) + 8 * (r >> 1);
      qf[kk][r] = row < w.num_cta_heads
                      ? *reinterpret_cast<const uint32_t*>(query + row * HEAD_DIM + dim)
                      : 0u;
    }
  }
}

// Writes NaN to the CTA's output rows (a seq_len out of range, one split; with several the
// merge writes them).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_nan_rows(const DecodeParams& p, const MmaWork& w) {
  using Cfg = DecodeMmaConfig<T, HEAD_DIM>;
  T* out = static_cast<T*>(p.out) + w.seq * p.out_stride + static_cast<int64_t>(w.head0) * HEAD_DIM;
  for (int i = threadIdx.x; i < w.num_cta_heads * Cfg::kVecsPerRow; i += Cfg::kThreads) {
    *reinterpret_cast<uint4*>(out + i * Cfg::kVec) = nan_vec<T>();  // rows are contiguous
  }
}

// Runs the split's tokens [start, end): each warp keeps the online softmax of its 16-token
// slices of every tile in `st`. The prefill steps take a warp's row tiles as arrays (the
// 128-row prefill tile has two); a decode warp has one row tile, so `st` and `qf` are
// arrays of one.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void attend_split(prefill_mma_detail::MmaRows<HEAD_DIM> (&st)[1],
                                             uint4* k_tile, uint4* v_tile,
                                             const uint32_t (&qf)[1][HEAD_DIM / 16][4],
                                             const DecodeParams& p, const MmaWork& w, int start,
                                             int end) {
  using Cfg = DecodeMmaConfig<T, HEAD_DIM>;
  using namespace prefill_mma_detail;
  constexpr int kN = Cfg::kWarpTokens;
  const int n0 = (threadIdx.x / 32) * kN;     // this warp's slice of each tile
  const int row_pos[2] = {INT_MAX, INT_MAX};  // no causal mask: every key precedes the query
  const int num_tiles = (end - start + Cfg::kTileTokens - 1) / Cfg::kTileTokens;
  load_tile<T, HEAD_DIM, BLOCK_SIZE>(k_tile, 0, p, w, start, end);
  cp_async_commit();
  for (int t = 0; t < num_tiles; ++t) {
    const int tile_start = start + t * Cfg::kTileTokens;
    const int n = min(Cfg::kTileTokens, end - tile_start);
    const bool run = n0 < n;  // warp-uniform: a slice past the split's end has nothing to do
    cp_async_wait<0>();
    __syncthreads();  // K(t) landed; every warp is done with V(t - 1)
    load_tile<T, HEAD_DIM, BLOCK_SIZE>(v_tile, 1, p, w, tile_start, end);
    cp_async_commit();
    float sp[1][kN / 8][4];  // S, then P in place
    if (run) {
      // Q in registers: no Q tile in shared memory (nullptr, row 0 are unused then).
      qk_tile<T, HEAD_DIM, kN, 1, true>(sp, qf, nullptr, 0, k_tile + n0 * Cfg::kStride);
      if (n0 + kN <= n) {
        softmax_tile<HEAD_DIM, kN, false>(sp[0], st[0], row_pos, n0, n, p.scale_log2);
      } else {
        softmax_tile<HEAD_DIM, kN, true>(sp[0], st[0], row_pos, n0, n, p.scale_log2);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V(t) landed; every warp is done with K(t)
    if (t + 1 < num_tiles) {
      load_tile<T, HEAD_DIM, BLOCK_SIZE>(k_tile, 0, p, w, tile_start + Cfg::kTileTokens, end);
    }
    cp_async_commit();
    if (run) pv_tile<T, HEAD_DIM, kN, 1>(st, sp, v_tile + n0 * Cfg::kStride);
  }
}

// Combines the four warps' states of each head and stores the normalised output (one split)
// or this split's partial state (several), as the SIMT kernel's merge_rows_and_store.
// `smem`: the tiles, free once every warp is past its last P V.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void merge_warps_and_store(
    uint4* smem, const prefill_mma_detail::MmaRows<HEAD_DIM>& st, const DecodeParams& p,
    const MmaWork& w) {
  using Cfg = DecodeMmaConfig<T, HEAD_DIM>;
  constexpr int kVec = Cfg::kVec;
  float* o_s = reinterpret_cast<float*>(smem);  // [kWarps][kRows][HEAD_DIM]
  float2* ml_s = reinterpret_cast<float2*>(o_s + Cfg::kWarps * Cfg::kRows * HEAD_DIM);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  cp_async_wait<0>();  // the last (empty) group: nothing may land on the states below
  __syncthreads();     // every warp is done reading the tiles
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = st.l[h];  // the quad's four lanes each summed a quarter of the keys
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = warp * Cfg::kRows + lane / 4 + 8 * h;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      *reinterpret_cast<float2*>(o_s + row * HEAD_DIM + d * 8 + 2 * (lane % 4)) =
          make_float2(st.o[d][2 * h], st.o[d][2 * h + 1]);
    }
    if (lane % 4 == 0) ml_s[row] = make_float2(st.m[h], l);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < w.num_cta_heads * Cfg::kVecsPerRow; i += Cfg::kThreads) {
    const int row = i / Cfg::kVecsPerRow;
    const int dim = (i % Cfg::kVecsPerRow) * kVec;
    float m_all = -INFINITY;
    for (int z = 0; z < Cfg::kWarps; ++z) m_all = fmaxf(m_all, ml_s[z * Cfg::kRows + row].x);
    float l_all = 0.f;
    float acc[kVec] = {};
    for (int z = 0; z < Cfg::kWarps; ++z) {
      const float2 ml = ml_s[z * Cfg::kRows + row];
      const float scale = ml.x == -INFINITY ? 0.f : fast_exp2(ml.x - m_all);  // idle: 0
      l_all = fmaf(ml.y, scale, l_all);
      const float* o = o_s + (z * Cfg::kRows + row) * HEAD_DIM + dim;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = fmaf(o[e], scale, acc[e]);
    }
    const int head = w.head0 + row;
    if (p.num_splits == 1) {
      const float inv_l = fast_rcp(l_all);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] *= inv_l;
      T* out = static_cast<T*>(p.out) + w.seq * p.out_stride +
               static_cast<int64_t>(head) * HEAD_DIM + dim;
      *reinterpret_cast<uint4*>(out) = float_to_vec<T>(acc);
      continue;
    }
    const int64_t idx = (static_cast<int64_t>(w.seq) * p.num_heads + head) * p.num_splits + w.split;
    float* dst = p.partial_out + idx * HEAD_DIM + dim;
#pragma unroll
    for (int e = 0; e < kVec; e += 4)
      *reinterpret_cast<float4*>(dst + e) = make_float4(acc[e], acc[e + 1], acc[e + 2], acc[e + 3]);
    if (dim == 0) p.partial_lse[idx] = make_float2(m_all, l_all);
  }
}

}  // namespace decode_mma_detail

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__global__ void __launch_bounds__(128) decode_mma_kernel(const DecodeParams p) {
  using namespace decode_mma_detail;
  extern __shared__ uint4 smem[];  // K and V tiles: [kTileTokens, kStride] words each
  uint4* k_tile = smem;
  uint4* v_tile = smem + DecodeMmaConfig<T, HEAD_DIM>::kTileWords;
  const MmaWork w = mma_work(p);
  if (w.num_cta_heads <= 0) return;  // every head is in an earlier tile
  const int seq_len = p.seq_lens[w.seq];
  if (seq_len < 1 || seq_len > static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size) {
    if (p.num_splits == 1) store_nan_rows<T, HEAD_DIM>(p, w);  // with splits the merge does
    return;
  }
  const int split_tokens = decode_split_tokens(seq_len, p.num_splits);
  const int start = w.split * split_tokens;
  const int end = min(start + split_tokens, seq_len);
  if (start >= end) return;  // this sequence needs fewer splits; the merge skips this one

  uint32_t qf[1][HEAD_DIM / 16][4];
  load_q_fragments<T, HEAD_DIM>(qf[0], p, w);
  prefill_mma_detail::MmaRows<HEAD_DIM> st[1];
  st[0].m[0] = st[0].m[1] = -INFINITY;
  st[0].l[0] = st[0].l[1] = 0.f;
#pragma unroll
  for (int d = 0; d < HEAD_DIM / 8; ++d) {
    st[0].o[d][0] = st[0].o[d][1] = st[0].o[d][2] = st[0].o[d][3] = 0.f;
  }
  attend_split<T, HEAD_DIM, BLOCK_SIZE>(st, k_tile, v_tile, qf, p, w, start, end);
  merge_warps_and_store<T, HEAD_DIM>(smem, st[0], p, w);
}

}  // namespace drt::cuda

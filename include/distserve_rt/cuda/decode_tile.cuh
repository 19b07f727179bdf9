// Per-tile device steps of decode attention (decode_attention.cuh has the kernels).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/cp_async.cuh"
#include "distserve_rt/cuda/decode_params.cuh"
#include "distserve_rt/cuda/dtype.cuh"
#include "distserve_rt/cuda/fast_math.cuh"

namespace drt::cuda {
namespace decode_detail {

// What one CTA works on: the (seq, kv head, head tile, split) and its thread's row.
struct DecodeWork {
  int seq;
  int kv_head;
  int split;
  int num_cta_heads;  // query heads of this CTA
  int num_z;          // token groups: rows with the same head split a tile's tokens
  int z;              // this row's token group (rows with z >= num_z idle)
  int head;           // this row's query head
  int lane;           // lane within the row: dims [lane * kVec, lane * kVec + kVec)
  bool active;
};

// Online-softmax state of one (query head, token group) row, this lane's dims.
template <int kVec>
struct RowState {
  float m;  // running max of scores (log2 domain)
  float l;  // running sum of exp2(score - m)
  float o[kVec];
};

template <typename Cfg>
__device__ __forceinline__ DecodeWork decode_work(const DecodeParams& p) {
  DecodeWork w;
  w.seq = blockIdx.z;
  w.kv_head = blockIdx.y / p.num_head_tiles;
  w.split = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int head_begin = (blockIdx.y % p.num_head_tiles) * p.heads_per_cta;
  w.num_cta_heads = min(p.heads_per_cta, group - head_begin);
  const int row = threadIdx.x / Cfg::kLanesPerRow;
  w.lane = threadIdx.x % Cfg::kLanesPerRow;
  w.num_z = w.num_cta_heads > 0 ? Cfg::kRows / w.num_cta_heads : 0;
  w.z = w.num_cta_heads > 0 ? row / w.num_cta_heads : 0;
  w.active = w.z < w.num_z;
  w.head = w.kv_head * group + head_begin + (w.active ? row - w.z * w.num_cta_heads : 0);
  return w;
}

// Issues the cp.async copies of tokens [tile_start, tile_start + kTileTokens) into `stage`:
// rows past `end` are zero-filled, rows whose block id is out of range are NaN.
template <typename T, typename Cfg, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void load_kv_tile(DecodeSmem<Cfg>& smem, int stage,
                                             const DecodeParams& p, const DecodeWork& w,
                                             int tile_start, int end) {
  const T* kv_cache = static_cast<const T*>(p.kv_cache);
  const int32_t* block_table = p.block_table + static_cast<int64_t>(w.seq) * p.max_blocks_per_seq;
  // V of a block follows its K: [2, num_kv_heads, BLOCK_SIZE, HEAD_DIM].
  const int64_t value_offset = static_cast<int64_t>(p.num_kv_heads) * BLOCK_SIZE * HEAD_DIM;
  for (int i = threadIdx.x; i < Cfg::kTileTokens * Cfg::kLanesPerRow; i += Cfg::kThreads) {
    const int tok = i / Cfg::kLanesPerRow;
    const int vec = i % Cfg::kLanesPerRow;
    const int pos = tile_start + tok;
    const T* src = kv_cache;  // any valid address: not read when the copy is predicated off
    bool valid = false;
    if (pos < end) {
      const int32_t block = block_table[pos / BLOCK_SIZE];
      if (block < 0 || block >= p.num_blocks) {
        smem.k[stage][tok][vec] = nan_vec<T>();
        smem.v[stage][tok][vec] = nan_vec<T>();
        continue;
      }
      src = kv_cache + block * p.kv_block_stride +
            (static_cast<int64_t>(w.kv_head) * BLOCK_SIZE + pos % BLOCK_SIZE) * HEAD_DIM +
            vec * Cfg::kVec;
      valid = true;
    }
    cp_async_16(&smem.k[stage][tok][vec], src, valid);
    cp_async_16(&smem.v[stage][tok][vec], src + value_offset, valid);
  }
}

// Sum over the kLanesPerRow lanes of a row (aligned lane groups, so xor stays inside).
template <int kLanes>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Runs one row over the `n` valid tokens of a tile in `stage`. Token groups take chunks
// round-robin; every thread runs the same number of rounds so that the shuffles of
// row_sum always have the whole warp.
template <typename T, typename Cfg>
__device__ __forceinline__ void attend_tile(const DecodeSmem<Cfg>& smem, int stage,
                                            const DecodeWork& w, const float (&q)[Cfg::kVec], int n,
                                            RowState<Cfg::kVec>& st) {
  const int num_chunks = (n + Cfg::kChunk - 1) / Cfg::kChunk;
  const int num_rounds = (Cfg::kChunksPerTile + w.num_z - 1) / w.num_z;
  for (int round = 0; round < num_rounds; ++round) {
    const int chunk = w.z + round * w.num_z;
    const bool run = w.active && chunk < num_chunks;
    const int first = (run ? chunk : 0) * Cfg::kChunk;  // idle rows read chunk 0, unused
    float s[Cfg::kChunk];
#pragma unroll
    for (int k = 0; k < Cfg::kChunk; ++k) {
      float kf[Cfg::kVec];
      vec_to_float<T>(smem.k[stage][first + k][w.lane], kf);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < Cfg::kVec; ++i) dot = fmaf(q[i], kf[i], dot);
      dot = row_sum<Cfg::kLanesPerRow>(dot);
      s[k] = first + k < n ? dot : -INFINITY;
    }
    if (!run) continue;
    float m_new = st.m;
#pragma unroll
    for (int k = 0; k < Cfg::kChunk; ++k) m_new = fmaxf(m_new, s[k]);
    const float alpha = fast_exp2(st.m - m_new);
    st.l *= alpha;
#pragma unroll
    for (int i = 0; i < Cfg::kVec; ++i) st.o[i] *= alpha;
#pragma unroll
    for (int k = 0; k < Cfg::kChunk; ++k) {
      const float prob = fast_exp2(s[k] - m_new);
      st.l += prob;
      float vf[Cfg::kVec];
      vec_to_float<T>(smem.v[stage][first + k][w.lane], vf);
#pragma unroll
      for (int i = 0; i < Cfg::kVec; ++i) st.o[i] = fmaf(prob, vf[i], st.o[i]);
    }
    st.m = m_new;
  }
}

}  // namespace decode_detail
}  // namespace drt::cuda

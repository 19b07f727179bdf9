// Paged decode attention (flash-decoding): one query token per sequence against its paged
// K/V, split along the sequence so that small batches still fill the GPU.
//
// Grid (split, kv_head x head_tile, seq); each CTA runs every query head of its GQA group
// (up to Cfg::kRows of them; larger groups are tiled) over one split's tokens, so a K/V
// tile is read from device memory once per group. Tiles stream through shared memory with
// cp.async, double-buffered. Softmax is online in fp32, in the log2 domain (fast_exp2). With
// more than one split, each CTA leaves (max, sum, unnormalised output) in the workspace and
// decode_merge_kernel combines the splits of each (seq, head). This is the SIMT kernel: for
// fp16/bf16 with GQA groups >= 4 launch_decode_attention routes to the tensor-core one
// (decode_mma.cuh), which keeps this grid, split and workspace layout.
//
// Bad inputs never cause out-of-bounds accesses: a block id out of range reads as NaN, and
// a seq_len < 1 or larger than the block table holds gives a NaN output row, so the error
// is visible instead of a silent wrong answer. No host synchronisation anywhere: the two
// launches can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distserve_rt/cuda/decode_mma.cuh"
#include "distserve_rt/cuda/decode_params.cuh"
#include "distserve_rt/cuda/decode_tile.cuh"
#include "distserve_rt/cuda/dtype.cuh"
#include "distserve_rt/cuda/fast_math.cuh"

namespace drt::cuda {
namespace decode_detail {

__device__ __forceinline__ bool bad_seq_len(int seq_len, const DecodeParams& p) {
  return seq_len < 1 || seq_len > static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
}

// Combines the token groups of each head (rows z > 0 into row z == 0), then stores the
// normalised output (one split) or this split's partial state (several).
template <typename T, typename Cfg>
__device__ __forceinline__ void merge_rows_and_store(DecodeSmem<Cfg>& smem, const DecodeParams& p,
                                                     const DecodeWork& w,
                                                     const RowState<Cfg::kVec>& st) {
  constexpr int kVec = Cfg::kVec;
  const int row = threadIdx.x / Cfg::kLanesPerRow;
  if (w.active) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) smem.o[row][w.lane * kVec + i] = st.o[i];
    if (w.lane == 0) smem.ml[row] = make_float2(st.m, st.l);
  }
  __syncthreads();
  if (!w.active || w.z != 0) return;  // row == local head index from here on
  float m_all = -INFINITY;
  for (int z = 0; z < w.num_z; ++z) m_all = fmaxf(m_all, smem.ml[z * w.num_cta_heads + row].x);
  float l_all = 0.f;
  float acc[kVec] = {};
  for (int z = 0; z < w.num_z; ++z) {
    const int r = z * w.num_cta_heads + row;
    const float2 ml = smem.ml[r];
    const float scale = ml.x == -INFINITY ? 0.f : fast_exp2(ml.x - m_all);  // empty group: 0
    l_all = fmaf(ml.y, scale, l_all);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = fmaf(smem.o[r][w.lane * kVec + i], scale, acc[i]);
  }
  if (p.num_splits == 1) {
    const float inv_l = fast_rcp(l_all);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] *= inv_l;
    T* out = static_cast<T*>(p.out) + w.seq * p.out_stride +
             static_cast<int64_t>(w.head) * Cfg::kLanesPerRow * kVec + w.lane * kVec;
    *reinterpret_cast<uint4*>(out) = float_to_vec<T>(acc);
    return;
  }
  const int64_t idx = (static_cast<int64_t>(w.seq) * p.num_heads + w.head) * p.num_splits + w.split;
  float* dst = p.partial_out + idx * Cfg::kLanesPerRow * kVec + w.lane * kVec;
#pragma unroll
  for (int i = 0; i < kVec; i += 4)
    *reinterpret_cast<float4*>(dst + i) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
  if (w.lane == 0) p.partial_lse[idx] = make_float2(m_all, l_all);
}

}  // namespace decode_detail

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__global__ void __launch_bounds__(128) decode_split_kernel(const DecodeParams p) {
  using Cfg = DecodeConfig<T, HEAD_DIM, BLOCK_SIZE>;
  using namespace decode_detail;
  __shared__ DecodeSmem<Cfg> smem;
  const DecodeWork w = decode_work<Cfg>(p);
  if (w.num_cta_heads <= 0) return;  // every head is in an earlier tile
  const int seq_len = p.seq_lens[w.seq];
  if (bad_seq_len(seq_len, p)) {
    if (p.num_splits == 1 && w.active && w.z == 0) {  // with splits the merge writes NaN
      T* out = static_cast<T*>(p.out) + w.seq * p.out_stride +
               static_cast<int64_t>(w.head) * HEAD_DIM + w.lane * Cfg::kVec;
      *reinterpret_cast<uint4*>(out) = nan_vec<T>();
    }
    return;
  }
  const int split_tokens = decode_split_tokens(seq_len, p.num_splits);
  const int start = w.split * split_tokens;
  const int end = min(start + split_tokens, seq_len);
  if (start >= end) return;  // this sequence needs fewer splits; the merge skips this one

  float q[Cfg::kVec];
  const T* query = static_cast<const T*>(p.query) + w.seq * p.query_stride +
                   static_cast<int64_t>(w.head) * HEAD_DIM + w.lane * Cfg::kVec;
  vec_to_float<T>(*reinterpret_cast<const uint4*>(query), q);
#pragma unroll
  for (int i = 0; i < Cfg::kVec; ++i) q[i] *= p.scale_log2;
  RowState<Cfg::kVec> st{-INFINITY, 0.f, {}};

  const int num_tiles = (end - start + Cfg::kTileTokens - 1) / Cfg::kTileTokens;
  load_kv_tile<T, Cfg, HEAD_DIM, BLOCK_SIZE>(smem, 0, p, w, start, end);
  cp_async_commit();
  for (int t = 0; t < num_tiles; ++t) {
    const int tile_start = start + t * Cfg::kTileTokens;
    if (t + 1 < num_tiles) {
      load_kv_tile<T, Cfg, HEAD_DIM, BLOCK_SIZE>(smem, (t + 1) & 1, p, w,
                                                 tile_start + Cfg::kTileTokens, end);
    }
    cp_async_commit();  // possibly empty: keeps "wait until 1 pending" meaning this tile
    cp_async_wait<1>();
    __syncthreads();
    attend_tile<T, Cfg>(smem, t & 1, w, q, min(Cfg::kTileTokens, end - tile_start), st);
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  merge_rows_and_store<T, Cfg>(smem, p, w, st);
}

// One CTA per (head, seq), one thread per dim: combines the splits of the sequence.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) decode_merge_kernel(const DecodeParams p) {
  const int seq = blockIdx.y;
  const int head = blockIdx.x;
  const int dim = threadIdx.x;
  const int seq_len = p.seq_lens[seq];
  T* out =
      static_cast<T*>(p.out) + seq * p.out_stride + static_cast<int64_t>(head) * HEAD_DIM + dim;
  if (decode_detail::bad_seq_len(seq_len, p)) {
    *out = from_float<T>(quiet_nan());
    return;
  }
  const int split_tokens = decode_split_tokens(seq_len, p.num_splits);
  const int num_used = (seq_len + split_tokens - 1) / split_tokens;
  const int64_t base = (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_splits;
  float m_all = -INFINITY;
  for (int s = 0; s < num_used; ++s) m_all = fmaxf(m_all, p.partial_lse[base + s].x);
  float l_all = 0.f;
  float acc = 0.f;
  for (int s = 0; s < num_used; ++s) {
    const float2 ml = p.partial_lse[base + s];
    const float scale = ml.x == -INFINITY ? 0.f : fast_exp2(ml.x - m_all);
    l_all = fmaf(ml.y, scale, l_all);
    acc = fmaf(p.partial_out[(base + s) * HEAD_DIM + dim], scale, acc);
  }
  *out = from_float<T>(acc * fast_rcp(l_all));
}

// GQA groups from which fp16/bf16 decode runs on tensor cores (decode_mma.cuh): below, most
// of the 16 M rows would be padding and the SIMT kernel is bandwidth-bound anyway.
inline constexpr int kDecodeMmaMinGroup = 4;

// Whether a launch takes the tensor-core kernel: fp16/bf16 (fp32 has no m16n8k16) and a
// group of kDecodeMmaMinGroup or more.
template <typename T>
bool decode_uses_mma(int num_heads, int num_kv_heads) {
  return sizeof(T) == 2 && num_heads / num_kv_heads >= kDecodeMmaMinGroup;
}

// Query heads per CTA of the kernel decode_uses_mma picks.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
int decode_rows_per_cta(bool mma) {
  if constexpr (sizeof(T) == 2) {
    if (mma) return DecodeMmaConfig<T, HEAD_DIM>::kRows;
  }
  return DecodeConfig<T, HEAD_DIM, BLOCK_SIZE>::kRows;
}

// CTAs of one split of the launch: what decode_num_splits multiplies by the split count.
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
int64_t decode_ctas_per_split(int64_t batch, int num_heads, int num_kv_heads) {
  const int rows =
      decode_rows_per_cta<T, HEAD_DIM, BLOCK_SIZE>(decode_uses_mma<T>(num_heads, num_kv_heads));
  return batch * num_kv_heads * decode_num_head_tiles(num_heads / num_kv_heads, rows);
}

// Launches the split kernel (tensor-core or SIMT, as decode_uses_mma says) and, with several
// splits, the merge. `p` needs every field but the head tiling, which depends on the kernel
// and is filled here (num_splits from decode_num_splits with the same tiling:
// decode_ctas_per_split).
template <typename T, int HEAD_DIM, int BLOCK_SIZE>
cudaError_t launch_decode_attention(DecodeParams p, cudaStream_t stream) {
  using Cfg = DecodeConfig<T, HEAD_DIM, BLOCK_SIZE>;
  const int group = p.num_heads / p.num_kv_heads;
  const bool mma = decode_uses_mma<T>(p.num_heads, p.num_kv_heads);
  p.num_head_tiles =
      decode_num_head_tiles(group, decode_rows_per_cta<T, HEAD_DIM, BLOCK_SIZE>(mma));
  p.heads_per_cta = (group + p.num_head_tiles - 1) / p.num_head_tiles;
  p.block_size = BLOCK_SIZE;
  const dim3 grid(p.num_splits, p.num_kv_heads * p.num_head_tiles, p.batch);
  bool launched = false;
  if constexpr (sizeof(T) == 2) {
    if (mma) {
      using MmaCfg = DecodeMmaConfig<T, HEAD_DIM>;
      decode_mma_kernel<T, HEAD_DIM, BLOCK_SIZE>
          <<<grid, MmaCfg::kThreads, MmaCfg::kSmemBytes, stream>>>(p);
      launched = true;
    }
  }
  if (!launched)
    decode_split_kernel<T, HEAD_DIM, BLOCK_SIZE><<<grid, Cfg::kThreads, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  decode_merge_kernel<T, HEAD_DIM><<<dim3(p.num_heads, p.batch), HEAD_DIM, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace drt::cuda

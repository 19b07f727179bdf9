// Paged decode attention on CPU: one query token per sequence attends to the seq_len tokens
// of its KV cache, read block by block through block_table (flash-decoding).
//
// Buffers (elements; see common.h):
//   query        [batch, num_heads, head_dim]      heads x dim dense, row stride query_stride
//   out          [batch, num_heads, head_dim]      heads x dim dense, row stride out_stride
//   kv_cache     [num_blocks, 2, num_kv_heads, block_size, head_dim]  dim 0 stride kv_block_stride
//   block_table  [batch, max_blocks_per_seq] int32
//   seq_lens     [batch] int32, each in [1, max_seq_len]
//   workspace    partial_out [batch, num_splits, num_heads, head_dim] fp32, then
//                partial_max and partial_sum [batch, num_splits, num_heads] fp32
//
// Threading and splits. A work item is (sequence, kv head, split): it computes every query
// head of that kv head's GQA group, so each K/V row is read from memory once per group, and
// one (block, kv head) is a dense [block_size, head_dim] tile (HND layout) that is streamed,
// converted to fp32 once and reused by the group's heads from L1. An item walks its tokens
// in chunks of ~256 (whole blocks): scores of the chunk's K tiles, one online-softmax update
// per head, then the chunk's V tiles, with software prefetch one step ahead of each pass.
// Decode is bandwidth-bound, so what matters is keeping every thread streaming: when
// batch * num_kv_heads gives fewer than kDecodeItemsPerThread items per thread (short
// batches of long contexts), each sequence is cut into splits of split_tokens tokens (a
// multiple of block_size, at least kDecodeMinSplitTokens so a split's fixed cost - loading
// q, writing a partial row, merging - stays small). Splits write an unnormalised partial
// output + running max + running sum to the workspace and a second pass merges them
// (log-sum-exp). A sequence no longer than split_tokens has one split and writes `out`
// directly. Items run longest first under a dynamic schedule (OpenMP, the thread count of
// the calling thread), so mixed-length batches balance across threads. The split count is
// per call, from max_seq_len: with very few kv heads, one long sequence in a large batch of
// short ones is not split and may finish last.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "distserve_rt/common.h"
#include "distserve_rt/cpu/decode_attention_tiles.h"
#include "distserve_rt/cpu/dtype.h"

namespace drt::cpu {

namespace decode_detail {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace decode_detail

struct DecodeAttentionParams {
  const void* query;           // [batch, num_heads, head_dim]
  void* out;                   // [batch, num_heads, head_dim]
  const void* kv_cache;        // [num_blocks, 2, num_kv_heads, block_size, head_dim]
  const int32_t* block_table;  // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;     // [batch]
  void* workspace;             // decode_workspace_bytes() bytes, fp32 partials
  int64_t workspace_bytes;
  int64_t batch, max_seq_len, num_heads, num_kv_heads, head_dim;
  int64_t query_stride, out_stride;  // elements between two sequences' rows
  float softmax_scale;
  int64_t num_blocks, block_size, kv_block_stride, max_blocks_per_seq;
};

constexpr int64_t kDecodeMaxHeadDim = 256;  // bounds the per-thread scratch
constexpr int64_t kDecodeMaxBlockSize = 64;
// About one chunk: a shorter split costs more (q load, partial row, merge) than it spreads.
constexpr int64_t kDecodeMinSplitTokens = 256;
constexpr int64_t kDecodeMaxSplits = 64;  // bounds the workspace on many-core machines
// Items per thread wanted before splitting: a few, so the dynamic schedule can even out
// items of unequal length instead of one thread finishing last.
constexpr int64_t kDecodeItemsPerThread = 4;

struct DecodeSplitPlan {
  int64_t num_splits;    // most splits of one sequence (rows of the workspace)
  int64_t split_tokens;  // tokens per split, a multiple of block_size
};

// Splits only when batch * num_kv_heads cannot keep num_threads busy (see the file comment).
// block_size = 1 gives the upper bound used to size the workspace.
inline DecodeSplitPlan plan_decode_splits(int64_t batch, int64_t num_kv_heads, int64_t max_seq_len,
                                          int64_t block_size, int64_t num_threads) {
  using decode_detail::ceil_div;
  const int64_t num_items = std::max<int64_t>(1, batch * num_kv_heads);
  const int64_t wanted = ceil_div(kDecodeItemsPerThread * num_threads, num_items);
  const int64_t by_len = std::max<int64_t>(1, max_seq_len / kDecodeMinSplitTokens);
  int64_t num_splits = std::clamp<int64_t>(std::min(wanted, by_len), 1, kDecodeMaxSplits);
  const int64_t split_tokens = ceil_div(ceil_div(max_seq_len, num_splits), block_size) * block_size;
  num_splits = ceil_div(max_seq_len, split_tokens);  // rounding up can leave fewer
  return {num_splits, split_tokens};
}

inline int64_t decode_workspace_bytes(const DecodeSplitPlan& plan, int64_t batch, int64_t num_heads,
                                      int64_t head_dim) {
  if (plan.num_splits <= 1) return 0;
  return batch * plan.num_splits * num_heads * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

// Workspace for any num_kv_heads and block_size: fewer kv heads means fewer items and more
// splits, so num_kv_heads = 1 bounds it.
inline int64_t decode_workspace_bytes_upper_bound(int64_t batch, int64_t num_heads,
                                                  int64_t head_dim, int64_t max_seq_len,
                                                  int64_t num_threads) {
  const DecodeSplitPlan plan = plan_decode_splits(batch, 1, max_seq_len, 1, num_threads);
  return decode_workspace_bytes(plan, batch, num_heads, head_dim);
}

namespace decode_detail {

// Tokens whose scores are kept at once: long rows amortise the softmax bookkeeping and the
// accumulator rescale; a multiple of block_size so chunks start on a block.
inline int64_t chunk_tokens_for(int64_t block_size) {
  return std::max<int64_t>(1, 256 / block_size) * block_size;
}

// Per-thread fp32 scratch, 64-byte aligned (one allocation per thread per call).
struct Scratch {
  std::unique_ptr<float[]> storage;
  float *q, *k_tile, *v_tile, *scores, *rescale, *acc, *row_max, *row_sum;
  int64_t chunk_tokens;

  Scratch(int64_t group, int64_t head_dim, int64_t block_size)
      : chunk_tokens(chunk_tokens_for(block_size)) {
    const int64_t pad = 16;                           // floats per 64 bytes
    const int64_t sizes[8] = {group * head_dim,       // q       [group, head_dim]
                              block_size * head_dim,  // k_tile  [block_size, head_dim]
                              block_size * head_dim,  // v_tile  [block_size, head_dim]
                              group * chunk_tokens,   // scores  [group, chunk_tokens]
                              group,                  // rescale [group]
                              group * head_dim,       // acc     [group, head_dim]
                              group,                  // row_max [group]
                              group};                 // row_sum [group]
    int64_t total = pad;
    for (int64_t s : sizes) total += ceil_div(s, pad) * pad;
    storage.reset(new float[total]);
    float* base = storage.get();
    base += (pad - (reinterpret_cast<std::uintptr_t>(base) / sizeof(float)) % pad) % pad;
    float** slots[8] = {&q, &k_tile, &v_tile, &scores, &rescale, &acc, &row_max, &row_sum};
    for (int i = 0; i < 8; ++i) {
      *slots[i] = base;
      base += ceil_div(sizes[i], pad) * pad;
    }
  }
};

// Where a finished item's rows go: straight to `out` (one split) or to the workspace.
struct ItemOutput {
  float* partial_out;  // [group, head_dim] rows at stride head_dim, or nullptr
  float* partial_max;  // [group]
  float* partial_sum;  // [group]
};

// Into L2 (locality 2): measured ~10% faster than into L1 or no prefetch on a streaming
// decode (batch 32, 4k context), where L1 fills would compete with the tile being computed.
inline void prefetch(const void* address, int64_t bytes) {
  const char* line = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(line + offset, 0, 2);
}

// One (sequence, kv head) tile of K or V: [block_size, head_dim], dense (HND layout).
template <typename T>
inline const T* cache_tile(const DecodeAttentionParams& p, const int32_t* blocks, int64_t pos,
                           int64_t kv_index) {
  const T* block =
      static_cast<const T*>(p.kv_cache) + blocks[pos / p.block_size] * p.kv_block_stride;
  return block + kv_index * p.block_size * p.head_dim;
}

// Scores then probabilities of tokens [begin, end) for the group, then their V rows added to
// the accumulators: K and V tiles are each streamed once per chunk. Blocks are scattered, so
// the hardware prefetcher cannot run ahead across them; software prefetches keep memory busy
// while the tiles in hand are computed: the K pass fetches the next K tile and this V tile,
// the V pass fetches the next chunk's K tiles (up to item_end).
template <typename T, int kDim>
void attend_chunk(const DecodeAttentionParams& p, const int32_t* blocks, int64_t kv_head,
                  int64_t begin, int64_t end, int64_t item_end, Scratch& s) {
  const int64_t dim = kDim > 0 ? kDim : p.head_dim;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t bs = p.block_size;
  const int64_t tile_bytes = bs * dim * static_cast<int64_t>(sizeof(T));
  const int64_t v_index = p.num_kv_heads + kv_head;
  for (int64_t pos = begin; pos < end; pos += bs) {
    const int64_t n = std::min(bs, end - pos);
    if (pos + bs < end) prefetch(cache_tile<T>(p, blocks, pos + bs, kv_head), tile_bytes);
    prefetch(cache_tile<T>(p, blocks, pos, v_index), tile_bytes);
    const float* k = tile_as_float(cache_tile<T>(p, blocks, pos, kv_head), n * dim, s.k_tile);
    tile_scores<kDim>(s.q, k, group, n, dim, s.chunk_tokens, s.scores + (pos - begin));
  }
  for (int64_t h = 0; h < group; ++h) {
    const float rescale =
        chunk_softmax(s.scores + h * s.chunk_tokens, end - begin, s.row_max[h], s.row_sum[h]);
    float* ah = s.acc + h * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) ah[d] *= rescale;
  }
  for (int64_t pos = begin; pos < end; pos += bs) {
    const int64_t n = std::min(bs, end - pos);
    const int64_t next_k = end + (pos - begin);
    if (next_k < item_end) prefetch(cache_tile<T>(p, blocks, next_k, kv_head), tile_bytes);
    const float* v = tile_as_float(cache_tile<T>(p, blocks, pos, v_index), n * dim, s.v_tile);
    tile_accumulate<kDim>(s.scores + (pos - begin), v, group, n, dim, s.chunk_tokens, s.acc);
  }
}

template <typename T, int kDim>
void attend_item(const DecodeAttentionParams& p, int64_t seq, int64_t kv_head, int64_t token_begin,
                 int64_t token_end, Scratch& s, const ItemOutput& dst) {
  const int64_t dim = kDim > 0 ? kDim : p.head_dim;
  const int64_t group = p.num_heads / p.num_kv_heads;
  const T* q = static_cast<const T*>(p.query) + seq * p.query_stride + kv_head * group * dim;
#pragma omp simd
  for (int64_t i = 0; i < group * dim; ++i) s.q[i] = to_float(q[i]) * p.softmax_scale;
  std::fill(s.acc, s.acc + group * dim, 0.0f);
  std::fill(s.row_max, s.row_max + group, -INFINITY);
  std::fill(s.row_sum, s.row_sum + group, 0.0f);
  const int32_t* blocks = p.block_table + seq * p.max_blocks_per_seq;
  for (int64_t pos = token_begin; pos < token_end; pos += s.chunk_tokens)
    attend_chunk<T, kDim>(p, blocks, kv_head, pos, std::min(pos + s.chunk_tokens, token_end),
                          token_end, s);

  if (dst.partial_out != nullptr) {
    std::memcpy(dst.partial_out, s.acc, group * dim * sizeof(float));
    std::memcpy(dst.partial_max, s.row_max, group * sizeof(float));
    std::memcpy(dst.partial_sum, s.row_sum, group * sizeof(float));
    return;
  }
  T* o = static_cast<T*>(p.out) + seq * p.out_stride + kv_head * group * dim;
  for (int64_t h = 0; h < group; ++h) {
    const float inv = 1.0f / s.row_sum[h];  // >= 1: the max token contributes exp(0)
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = from_float<T>(s.acc[h * dim + d] * inv);
  }
}

// Merges the splits of one (sequence, head), M being the largest split max:
//   out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
template <typename T>
void merge_splits(const DecodeAttentionParams& p, const DecodeSplitPlan& plan, int64_t seq,
                  int64_t head, int64_t num_splits, float* merged) {
  const int64_t dim = p.head_dim;
  const float* partial_out = static_cast<const float*>(p.workspace);
  const int64_t rows = p.batch * plan.num_splits * p.num_heads;
  const float* partial_max = partial_out + rows * dim;
  const float* partial_sum = partial_max + rows;
  const int64_t row0 = seq * plan.num_splits * p.num_heads + head;  // split 0's row
  float global_max = -INFINITY;
  for (int64_t sp = 0; sp < num_splits; ++sp)
    global_max = std::max(global_max, partial_max[row0 + sp * p.num_heads]);
  std::fill(merged, merged + dim, 0.0f);
  float total = 0.0f;
  for (int64_t sp = 0; sp < num_splits; ++sp) {
    const int64_t row = row0 + sp * p.num_heads;
    const float w = exp_nonpositive(partial_max[row] - global_max);
    total += w * partial_sum[row];
    const float* src = partial_out + row * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) merged[d] += w * src[d];
  }
  T* o = static_cast<T*>(p.out) + seq * p.out_stride + head * dim;
  const float inv = 1.0f / total;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) o[d] = from_float<T>(merged[d] * inv);
}

// (sequence, split) pairs, longest first so the dynamic schedule ends balanced.
struct SplitWork {
  int32_t seq, split, num_tokens;
};

inline std::vector<SplitWork> list_split_work(const DecodeAttentionParams& p,
                                              const DecodeSplitPlan& plan) {
  std::vector<SplitWork> work;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.seq_lens[b];
    for (int64_t sp = 0; sp * plan.split_tokens < len; ++sp) {
      const int64_t n = std::min(plan.split_tokens, len - sp * plan.split_tokens);
      work.push_back({static_cast<int32_t>(b), static_cast<int32_t>(sp), static_cast<int32_t>(n)});
    }
  }
  std::stable_sort(work.begin(), work.end(), [](const SplitWork& a, const SplitWork& b) {
    return a.num_tokens > b.num_tokens;
  });
  return work;
}

template <typename T, int kDim>
Status run_decode(const DecodeAttentionParams& p, const DecodeSplitPlan& plan) {
  const std::vector<SplitWork> work = list_split_work(p, plan);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t num_items = static_cast<int64_t>(work.size()) * p.num_kv_heads;
  float* partial_out = static_cast<float*>(p.workspace);
  const int64_t rows = p.batch * plan.num_splits * p.num_heads;
  float* partial_max = partial_out == nullptr ? nullptr : partial_out + rows * p.head_dim;
  float* partial_sum = partial_max == nullptr ? nullptr : partial_max + rows;
#pragma omp parallel
  {
    Scratch scratch(group, p.head_dim, p.block_size);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < num_items; ++item) {
      const SplitWork& w = work[item / p.num_kv_heads];
      const int64_t kv_head = item % p.num_kv_heads;
      const int64_t begin = w.split * plan.split_tokens;
      ItemOutput dst{nullptr, nullptr, nullptr};
      if (p.seq_lens[w.seq] > plan.split_tokens) {
        const int64_t row = (w.seq * plan.num_splits + w.split) * p.num_heads + kv_head * group;
        dst = {partial_out + row * p.head_dim, partial_max + row, partial_sum + row};
      }
      attend_item<T, kDim>(p, w.seq, kv_head, begin, begin + w.num_tokens, scratch, dst);
    }
    // Second pass: the implicit barrier above makes every split's partial rows visible.
    std::vector<float> merged(p.head_dim);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < p.batch * p.num_heads; ++row) {
      const int64_t seq = row / p.num_heads;
      const int64_t len = p.seq_lens[seq];
      if (len > plan.split_tokens)
        merge_splits<T>(p, plan, seq, row % p.num_heads, ceil_div(len, plan.split_tokens),
                        merged.data());
    }
  }
  return Status::kOk;
}

}  // namespace decode_detail

// Runs decode attention for scalar type T (float, fp16, bf16). Argument values are the
// launcher's job (csrc/cpu/decode_attention.cpp); this only refuses what would make the
// kernel itself write out of bounds: unsupported sizes and a workspace below the plan's.
template <typename T>
Status decode_attention(const DecodeAttentionParams& p) {
  if (p.batch == 0) return Status::kOk;
  if (p.head_dim < 1 || p.head_dim > kDecodeMaxHeadDim || p.block_size < 1 ||
      p.block_size > kDecodeMaxBlockSize || p.num_kv_heads < 1 ||
      p.num_heads % p.num_kv_heads != 0 || p.max_seq_len < 1)
    return Status::kInvalidArgument;
  const DecodeSplitPlan plan = plan_decode_splits(p.batch, p.num_kv_heads, p.max_seq_len,
                                                  p.block_size, omp_get_max_threads());
  const int64_t needed = decode_workspace_bytes(plan, p.batch, p.num_heads, p.head_dim);
  if (needed > 0 && (p.workspace == nullptr || p.workspace_bytes < needed))
    return Status::kInvalidArgument;
  if (p.head_dim == 64) return decode_detail::run_decode<T, 64>(p, plan);
  if (p.head_dim == 128) return decode_detail::run_decode<T, 128>(p, plan);
  return decode_detail::run_decode<T, 0>(p, plan);
}

}  // namespace drt::cpu

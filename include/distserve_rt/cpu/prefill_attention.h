// CPU prefill attention: causal, varlen (cu_seqlens), GQA/MQA, optional paged prefix
// (chunked prefill) and optional fused write of the new K/V into the paged cache.
//
// Algorithm: FlashAttention-2 on CPU. One work item = (sequence, kv head, query tile). Its
// rows are the tile's query tokens times the kv head's whole GQA group (row = token * group
// + head, the order of query memory), so every K/V tile is read once per group, not once
// per query head. Keys are streamed in tiles of kKeyTile (64): first the prefix from the
// paged cache through block_table, then the new tokens; a running max and sum per row
// (online softmax) and fp32 accumulators keep memory O(tile), never O(seq_len^2). The tile
// math and its layout are in prefill_attention_tile.h.
//
// Tiling: query tiles hold kTileRows = 64 rows (tokens = 64 / group), so one converted K/V
// tile feeds 64 rows and the per-thread scratch (~150 KiB at head_dim 128) stays in L2.
// New K/V are packed once per call into fp32 [2, num_kv_heads, num_tokens, ld] (workspace:
// 8 * num_tokens * num_kv_heads * head_dim bytes): a token's row of one kv head is only
// head_dim elements but tokens sit num_kv_heads * head_dim (or a whole qkv row) apart, so
// reading them per tile touched a new page per key and converted each key once per query
// tile; packed, a key tile is a contiguous fp32 block used in place. The fused K/V write to
// the cache shares that pass (its one read of key/value) and completes before any prefix is
// read, so the result is exactly write_kv followed by attention. Prefix tiles are already
// contiguous per block and kv head; they are converted per tile.
//
// Threading: one OpenMP region. The pack pass splits tokens statically (uniform work); the
// attention loop runs all (query tile, kv head) items with schedule(dynamic, 1), heaviest
// first (causal: late tiles of long sequences see the most keys), so uneven lengths still
// balance. Items share no output rows, so results do not depend on the thread count.
//
// Contract (checked by the launcher in csrc/, not here): cu_seqlens sane, ids in range.
// Duplicate slots in slot_mapping race as in write_kv (one of the writes wins).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "distserve_rt/common.h"
#include "distserve_rt/cpu/dtype.h"
#include "distserve_rt/cpu/prefill_attention_tile.h"

namespace drt::cpu {

template <typename T>
struct PrefillAttentionParams {
  const T* query;             // [num_tokens, num_heads, head_dim], token stride given
  const T* key;               // [num_tokens, num_kv_heads, head_dim], token stride given
  const T* value;             // [num_tokens, num_kv_heads, head_dim], token stride given
  T* out;                     // [num_tokens, num_heads, head_dim], token stride given
  const int32_t* cu_seqlens;  // [batch + 1]
  int batch;
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_dim;                // <= kMaxHeadDim
  int64_t query_token_stride;  // elements between tokens
  int64_t key_token_stride;
  int64_t value_token_stride;
  int64_t out_token_stride;
  float softmax_scale;
  T* kv_cache;  // [num_blocks, 2, num_kv_heads, block_size, head_dim]; nullptr: no cache
  const int32_t* block_table;   // [batch, max_blocks_per_seq]; nullptr: no prefix
  const int32_t* prefix_lens;   // [batch]; nullptr: no prefix
  const int64_t* slot_mapping;  // [num_tokens]; nullptr: new K/V not written
  int block_size;
  int64_t kv_block_stride;  // elements between blocks of kv_cache
  int max_blocks_per_seq;
};

constexpr int kMaxHeadDim = 256;

namespace prefill_detail {

// One query tile of one kv head of one sequence. `cost` = keys its last row attends to.
struct WorkItem {
  int seq;
  int q_begin;  // first new token of the tile, relative to the sequence
  int num_q;
  int64_t cost;
};

// The new tokens' K and V in fp32: [2, num_kv_heads, num_tokens + 3, ld]. The 3 zero rows
// after each matrix let the 4-key score kernel read past the last token.
struct PackedKV {
  float* data = nullptr;
  int num_kv_heads = 0;
  int64_t rows = 0;
  int ld = 0;

  PackedKV() = default;
  PackedKV(const PackedKV&) = delete;
  PackedKV& operator=(const PackedKV&) = delete;
  ~PackedKV() { std::free(data); }

  bool allocate(int num_kv_heads_, int num_tokens, int head_dim) {
    num_kv_heads = num_kv_heads_;
    rows = int64_t(num_tokens) + 3;
    ld = (head_dim + 15) / 16 * 16;
    const std::size_t n = std::size_t(2) * num_kv_heads * rows * ld;
    data = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    if (data == nullptr) return false;
    for (int side = 0; side < 2; ++side)
      for (int h = 0; h < num_kv_heads; ++h)
        std::memset(at(side, h, num_tokens), 0, sizeof(float) * 3 * ld);
    return true;
  }
  // side 0 = key, 1 = value
  float* at(int side, int kv_head, int64_t token) const {
    return data + ((int64_t(side) * num_kv_heads + kv_head) * rows + token) * ld;
  }
};

// Token t's K/V rows of every kv head into its slot (what write_kv does); slot < 0 = padding.
template <typename T>
void write_token_kv(const PrefillAttentionParams<T>& p, int64_t t) {
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t side_stride = int64_t(p.num_kv_heads) * p.block_size * p.head_dim;
  T* dst = p.kv_cache + (slot / p.block_size) * p.kv_block_stride +
           (slot % p.block_size) * p.head_dim;  // kv head 0 of the slot
  for (int h = 0; h < p.num_kv_heads; ++h) {
    const int64_t head = int64_t(h) * p.head_dim;
    T* kdst = dst + int64_t(h) * p.block_size * p.head_dim;
    std::memcpy(kdst, p.key + t * p.key_token_stride + head, sizeof(T) * p.head_dim);
    std::memcpy(kdst + side_stride, p.value + t * p.value_token_stride + head,
                sizeof(T) * p.head_dim);
  }
}

// Packs the new K/V (and writes them to their slots); called inside the parallel region.
template <typename T>
void pack_new_kv(const PrefillAttentionParams<T>& p, const PackedKV& kv) {
#pragma omp for schedule(static)
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const T* krow = p.key + t * p.key_token_stride + int64_t(h) * p.head_dim;
      const T* vrow = p.value + t * p.value_token_stride + int64_t(h) * p.head_dim;
      float* kdst = kv.at(0, h, t);
      float* vdst = kv.at(1, h, t);
#pragma omp simd
      for (int d = 0; d < p.head_dim; ++d) kdst[d] = to_float(krow[d]);
#pragma omp simd
      for (int d = 0; d < p.head_dim; ++d) vdst[d] = to_float(vrow[d]);
    }
    if (p.slot_mapping != nullptr) write_token_kv(p, t);
  }
}

// Q rows of the item into sc.qt (transposed, fp32, scaled by softmax_scale * log2(e)); the
// padding rows up to mp are zero so they stay finite. Once per item, so its scattered
// stores are amortised over every key tile.
template <typename T>
void load_query_tile(const PrefillAttentionParams<T>& p, const WorkItem& w, int kv_head, int mp,
                     Scratch& sc) {
  const int group = p.num_heads / p.num_kv_heads;
  const float scale = p.softmax_scale * kLog2e;
  for (int t = 0; t < w.num_q; ++t) {
    const int64_t token = p.cu_seqlens[w.seq] + w.q_begin + t;
    const T* src = p.query + token * p.query_token_stride + int64_t(kv_head) * group * p.head_dim;
    for (int h = 0; h < group; ++h) {
      const T* row = src + int64_t(h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) sc.qt[d * mp + t * group + h] = to_float(row[d]) * scale;
    }
  }
  for (int d = 0; d < p.head_dim; ++d)
    for (int r = w.num_q * group; r < mp; ++r) sc.qt[d * mp + r] = 0.0f;
  for (int r = 0; r < mp; ++r) sc.row_token[r] = r / group;
}

// Prefix positions [k_begin, k_begin + num_keys) of `seq` from the paged cache into sc.k and
// sc.v (fp32); key rows up to the next multiple of 4 are zeroed for the score kernel.
template <typename T>
void load_prefix_tile(const PrefillAttentionParams<T>& p, int seq, int kv_head, int k_begin,
                      int num_keys, Scratch& sc) {
  const int32_t* block_ids = p.block_table + int64_t(seq) * p.max_blocks_per_seq;
  const int64_t side_stride = int64_t(p.num_kv_heads) * p.block_size * p.head_dim;
  for (int k = 0; k < num_keys; ++k) {
    const int pos = k_begin + k;
    const T* krow = p.kv_cache + block_ids[pos / p.block_size] * p.kv_block_stride +
                    (int64_t(kv_head) * p.block_size + pos % p.block_size) * p.head_dim;
    const T* vrow = krow + side_stride;
    float* kdst = sc.k + std::size_t(k) * sc.ld;
    float* vdst = sc.v + std::size_t(k) * sc.ld;
#pragma omp simd
    for (int d = 0; d < p.head_dim; ++d) kdst[d] = to_float(krow[d]);
#pragma omp simd
    for (int d = 0; d < p.head_dim; ++d) vdst[d] = to_float(vrow[d]);
  }
  for (int k = num_keys; k % 4 != 0; ++k)
    std::memset(sc.k + std::size_t(k) * sc.ld, 0, sizeof(float) * p.head_dim);
}

// out rows of the item = o / l, in T.
template <typename T>
void store_output(const PrefillAttentionParams<T>& p, const WorkItem& w, int kv_head,
                  const Scratch& sc) {
  const int group = p.num_heads / p.num_kv_heads;
  for (int t = 0; t < w.num_q; ++t) {
    const int64_t token = p.cu_seqlens[w.seq] + w.q_begin + t;
    T* dst = p.out + token * p.out_token_stride + int64_t(kv_head) * group * p.head_dim;
    for (int h = 0; h < group; ++h) {
      const int r = t * group + h;
      const float inv_l = 1.0f / sc.l[r];  // l >= 1: the row max contributes 2^0
      const float* src = sc.o + std::size_t(r) * sc.ld;
      T* out_row = dst + int64_t(h) * p.head_dim;
#pragma omp simd
      for (int d = 0; d < p.head_dim; ++d) out_row[d] = from_float<T>(src[d] * inv_l);
    }
  }
}

template <int D, typename T>
void attend_item(const PrefillAttentionParams<T>& p, const PackedKV& kv, const WorkItem& w,
                 int kv_head, Scratch& sc) {
  const int num_rows = w.num_q * (p.num_heads / p.num_kv_heads);
  const int mp = (num_rows + 15) / 16 * 16;
  const int prefix_len = p.prefix_lens != nullptr ? p.prefix_lens[w.seq] : 0;
  load_query_tile(p, w, kv_head, mp, sc);
  std::fill(sc.m, sc.m + mp, -std::numeric_limits<float>::infinity());
  std::fill(sc.l, sc.l + mp, 0.0f);
  std::memset(sc.o, 0, sizeof(float) * std::size_t(num_rows) * sc.ld);

  const int first_pos = prefix_len + w.q_begin;  // absolute position of the tile's token 0
  auto attend_keys = [&](const float* k, const float* v, int k_begin, int num_keys) {
    score_tile(sc, mp, k, num_keys, p.head_dim);
    softmax_tile(sc, mp, num_keys, first_pos + 1 - k_begin);
    accumulate_tile<D>(sc, mp, num_rows, v, num_keys, p.head_dim);
  };
  for (int k_begin = 0; k_begin < prefix_len; k_begin += kKeyTile) {
    const int num_keys = std::min(kKeyTile, prefix_len - k_begin);
    load_prefix_tile(p, w.seq, kv_head, k_begin, num_keys, sc);
    attend_keys(sc.k, sc.v, k_begin, num_keys);
  }
  const int64_t seq_start = p.cu_seqlens[w.seq];
  const int new_end = w.q_begin + w.num_q;  // the last token sees new keys [0, new_end)
  for (int k_begin = 0; k_begin < new_end; k_begin += kKeyTile) {
    const int num_keys = std::min(kKeyTile, new_end - k_begin);
    attend_keys(kv.at(0, kv_head, seq_start + k_begin), kv.at(1, kv_head, seq_start + k_begin),
                prefix_len + k_begin, num_keys);
  }
  store_output(p, w, kv_head, sc);
}

// Query tiles of every sequence, heaviest first (see the threading note at the top).
template <typename T>
std::vector<WorkItem> make_work_items(const PrefillAttentionParams<T>& p, int tile_tokens) {
  std::vector<WorkItem> items;
  for (int i = 0; i < p.batch; ++i) {
    const int seq_len = p.cu_seqlens[i + 1] - p.cu_seqlens[i];
    const int prefix_len = p.prefix_lens != nullptr ? p.prefix_lens[i] : 0;
    for (int q = 0; q < seq_len; q += tile_tokens) {
      const int num_q = std::min(tile_tokens, seq_len - q);
      items.push_back({i, q, num_q, int64_t(prefix_len) + q + num_q});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

template <int D, typename T>
Status run(const PrefillAttentionParams<T>& p) {
  const int group = p.num_heads / p.num_kv_heads;
  const int tile_tokens = std::max(1, kTileRows / group);
  std::vector<WorkItem> items;
  try {
    items = make_work_items(p, tile_tokens);
  } catch (const std::bad_alloc&) {
    return Status::kOutOfMemory;
  }
  PackedKV kv;
  if (!kv.allocate(p.num_kv_heads, p.num_tokens, p.head_dim)) return Status::kOutOfMemory;
  const int64_t num_work = int64_t(items.size()) * p.num_kv_heads;
  bool out_of_memory = false;
#pragma omp parallel if (num_work > 1)
  {
    pack_new_kv(p, kv);  // ends with the worksharing loop's barrier: packed before used
    Scratch sc;
    const bool ok = sc.allocate(tile_tokens * group, p.head_dim);
    if (!ok) {
#pragma omp atomic write
      out_of_memory = true;
    }
    // Every thread must reach the worksharing loop; one without scratch takes no items.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_work; ++i) {
      if (ok) attend_item<D>(p, kv, items[i / p.num_kv_heads], int(i % p.num_kv_heads), sc);
    }
  }
  return out_of_memory ? Status::kOutOfMemory : Status::kOk;
}

}  // namespace prefill_detail

// Causal varlen attention of the new tokens (see PrefillAttentionParams for the layout).
// Expects arguments already checked (csrc/cpu/prefill_attention.cpp); returns
// kInvalidArgument only for shapes the kernel cannot run, kOutOfMemory if scratch fails.
template <typename T>
Status prefill_attention(const PrefillAttentionParams<T>& p) {
  if (p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0 || p.head_dim < 1 ||
      p.head_dim > kMaxHeadDim || p.batch < 0)
    return Status::kInvalidArgument;
  if ((p.prefix_lens != nullptr || p.slot_mapping != nullptr) && p.kv_cache == nullptr)
    return Status::kInvalidArgument;
  if (p.prefix_lens != nullptr && (p.block_table == nullptr || p.block_size < 1))
    return Status::kInvalidArgument;
  switch (p.head_dim) {
    case 64:
      return prefill_detail::run<64>(p);
    case 128:
      return prefill_detail::run<128>(p);
    default:
      return prefill_detail::run<0>(p);
  }
}

}  // namespace drt::cpu

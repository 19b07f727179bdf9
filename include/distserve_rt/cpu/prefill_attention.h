// CPU prefill attention: causal, varlen (cu_seqlens), GQA/MQA, optional paged prefix
// (chunked prefill) and optional fused write of the new K/V into the paged cache.
//
// Algorithm: FlashAttention-2 on CPU. One work item = (sequence, kv head, query tile). Its
// rows are the tile's query tokens times the kv head's whole GQA group (row = token * group
// + head, the order of query memory), so every K/V tile is loaded and converted once per
// group, not once per query head. Keys are streamed in tiles of kKeyTile positions through
// one absolute position space (prefix positions come from the paged cache through
// block_table, later ones from the new key/value rows), with a running max and sum per row
// (online softmax) and fp32 accumulators, so memory is O(tile), never O(seq_len^2).
//
// Tiling: kKeyTile = 64 keys (four 16-float vectors per score row); query tiles hold about
// kTileRows = 64 rows (tokens = ceil(64 / group)), so the per-thread scratch (Q, K^T, V, S,
// O: ~150 KiB at head_dim 128) stays in L2 and each converted K/V tile feeds 64 rows.
// bf16/fp16 tiles are converted to fp32 once when loaded; the inner loops are fixed-width
// fp32 loops with `omp simd`. K is stored transposed ([head_dim, kKeyTile]) so QK^T is an
// outer-product update vectorised over keys, 4 query rows at a time (16 accumulators); PV is
// vectorised over head_dim, 256 / head_dim rows at a time. Softmax uses exp2 with
// log2(e) folded into the query scale and a polynomial exp2 that vectorises.
//
// Threading: OpenMP over all (query tile, kv head) items with schedule(dynamic, 1); items
// are sorted by their key count, heaviest first (causal: late tiles of long sequences do
// the most work), so uneven lengths still balance. Items share no output rows, and each
// item writes the cache slots of its own tokens and kv head, so no synchronisation is
// needed and results do not depend on the thread count.
//
// Contract (checked by the launcher in csrc/, not here): cu_seqlens sane, ids in range, the
// new tokens' slots do not hold prefix tokens that this batch reads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "distserve_rt/common.h"
#include "distserve_rt/cpu/dtype.h"

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

constexpr int kKeyTile = 64;
constexpr int kTileRows = 64;
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (-inf gives 0). Branch-free so `omp simd` loops vectorise it (libm's exp2f
// does not without -ffast-math). 2^x = 2^n * 2^f, n = round(x), |f| <= 1/2; degree-7
// Taylor series of 2^f: relative error < 1e-8, below fp32 rounding.
inline float exp2_nonpositive(float x) {
  const bool underflow = x < -126.0f;  // also -inf; 0 is within a denormal of the truth
  const float xc = underflow ? -126.0f : x;
  const float n = __builtin_floorf(xc + 0.5f);
  const float f = xc - n;
  float p = 1.5252733804059841e-5f;  // ln2^7 / 7!
  p = p * f + 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return underflow ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// Per-thread fp32 scratch, 64-byte aligned; `ld` = head_dim rounded up to 16 floats.
struct Scratch {
  int ld = 0;
  float* base = nullptr;
  float* q = nullptr;      // [rows, ld]       query tile, pre-scaled by scale * log2(e)
  float* kt = nullptr;     // [head_dim, kKeyTile]  key tile, transposed
  float* v = nullptr;      // [kKeyTile, ld]   value tile
  float* s = nullptr;      // [rows, kKeyTile] scores, then probabilities
  float* o = nullptr;      // [rows, ld]       output accumulators
  float* m = nullptr;      // [rows]           running max (log2 domain)
  float* l = nullptr;      // [rows]           running sum
  float* alpha = nullptr;  // [rows]           rescale of o for the current key tile

  bool allocate(int max_rows, int head_dim) {
    ld = (head_dim + 15) / 16 * 16;
    const int rows = (max_rows + 15) / 16 * 16;
    const std::size_t n = std::size_t(rows) * ld * 2 + std::size_t(ld) * kKeyTile * 2 +
                          std::size_t(rows) * kKeyTile + std::size_t(rows) * 3;
    base = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    if (base == nullptr) return false;
    q = base;
    kt = q + std::size_t(rows) * ld;
    v = kt + std::size_t(ld) * kKeyTile;
    s = v + std::size_t(ld) * kKeyTile;
    o = s + std::size_t(rows) * kKeyTile;
    m = o + std::size_t(rows) * ld;
    l = m + rows;
    alpha = l + rows;
    return true;
  }
  ~Scratch() { std::free(base); }
};

// One query tile of one kv head of one sequence. `cost` = keys its last row attends to.
struct WorkItem {
  int seq;
  int q_begin;  // first new token of the tile, relative to the sequence
  int num_q;
  int64_t cost;
};

// Where one sequence's keys live for one kv head: absolute position p < prefix_len is in the
// paged cache, p >= prefix_len is new token p - prefix_len.
template <typename T>
struct KeySource {
  const PrefillAttentionParams<T>& p;
  int seq;
  int kv_head;
  int prefix_len;

  // side 0 = key, 1 = value; returns the head_dim elements of position `pos`.
  const T* row(int pos, int side) const {
    if (pos < prefix_len) {
      const int32_t block = p.block_table[int64_t(seq) * p.max_blocks_per_seq + pos / p.block_size];
      return p.kv_cache + block * p.kv_block_stride +
             ((int64_t(side) * p.num_kv_heads + kv_head) * p.block_size + pos % p.block_size) *
                 p.head_dim;
    }
    const int64_t token = p.cu_seqlens[seq] + (pos - prefix_len);
    return side == 0 ? p.key + token * p.key_token_stride + int64_t(kv_head) * p.head_dim
                     : p.value + token * p.value_token_stride + int64_t(kv_head) * p.head_dim;
  }
};

// Copies the item's new K/V rows of `kv_head` into their slots (what write_kv does), so the
// write costs no extra pass over key/value and no synchronisation (items own their tokens).
template <typename T>
void write_item_kv(const PrefillAttentionParams<T>& p, const WorkItem& w, int kv_head) {
  const int64_t side_stride = int64_t(p.num_kv_heads) * p.block_size * p.head_dim;
  for (int t = 0; t < w.num_q; ++t) {
    const int64_t token = p.cu_seqlens[w.seq] + w.q_begin + t;
    const int64_t slot = p.slot_mapping[token];
    if (slot < 0) continue;  // padding
    T* dst = p.kv_cache + (slot / p.block_size) * p.kv_block_stride +
             (int64_t(kv_head) * p.block_size + slot % p.block_size) * p.head_dim;
    const int64_t src = int64_t(kv_head) * p.head_dim;
    std::memcpy(dst, p.key + token * p.key_token_stride + src, sizeof(T) * p.head_dim);
    std::memcpy(dst + side_stride, p.value + token * p.value_token_stride + src,
                sizeof(T) * p.head_dim);
  }
}

// Q rows of the item, converted to fp32 and scaled by softmax_scale * log2(e).
template <typename T>
void load_query_tile(const PrefillAttentionParams<T>& p, const WorkItem& w, int kv_head,
                     Scratch& sc) {
  const int group = p.num_heads / p.num_kv_heads;
  const float scale = p.softmax_scale * kLog2e;
  for (int t = 0; t < w.num_q; ++t) {
    const int64_t token = p.cu_seqlens[w.seq] + w.q_begin + t;
    const T* src = p.query + token * p.query_token_stride + int64_t(kv_head) * group * p.head_dim;
    for (int h = 0; h < group; ++h) {
      float* dst = sc.q + std::size_t(t * group + h) * sc.ld;
      const T* row = src + int64_t(h) * p.head_dim;
#pragma omp simd
      for (int d = 0; d < p.head_dim; ++d) dst[d] = to_float(row[d]) * scale;
    }
  }
}

// Keys [k_begin, k_begin + num_keys) into sc.kt (transposed) and sc.v; the rest of the tile
// is zeroed so the fixed-width loops below never read stale or uninitialised floats.
template <typename T>
void load_key_value_tile(const KeySource<T>& src, int k_begin, int num_keys, Scratch& sc) {
  const int head_dim = src.p.head_dim;
  for (int k = 0; k < num_keys; ++k) {
    const T* krow = src.row(k_begin + k, 0);
    const T* vrow = src.row(k_begin + k, 1);
    for (int d = 0; d < head_dim; ++d) sc.kt[d * kKeyTile + k] = to_float(krow[d]);
    float* vdst = sc.v + std::size_t(k) * sc.ld;
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) vdst[d] = to_float(vrow[d]);
  }
  for (int k = num_keys; k < kKeyTile; ++k) {
    for (int d = 0; d < head_dim; ++d) sc.kt[d * kKeyTile + k] = 0.0f;
    std::memset(sc.v + std::size_t(k) * sc.ld, 0, sizeof(float) * head_dim);
  }
}

// s[r, :] = q[r, :] . kt  for ROWS rows: ROWS x kKeyTile accumulators stay in registers.
template <int ROWS>
inline void score_rows(const float* q, int ld, const float* kt, int head_dim, float* s) {
  float acc[ROWS][kKeyTile] = {};
  for (int d = 0; d < head_dim; ++d) {
    const float* krow = kt + d * kKeyTile;
    for (int r = 0; r < ROWS; ++r) {
      const float qd = q[r * ld + d];
#pragma omp simd
      for (int k = 0; k < kKeyTile; ++k) acc[r][k] += qd * krow[k];
    }
  }
  for (int r = 0; r < ROWS; ++r) std::memcpy(s + r * kKeyTile, acc[r], sizeof(acc[r]));
}

inline void score_tile(const Scratch& sc, int num_rows, int head_dim) {
  int r = 0;
  for (; r + 4 <= num_rows; r += 4)
    score_rows<4>(sc.q + std::size_t(r) * sc.ld, sc.ld, sc.kt, head_dim, sc.s + r * kKeyTile);
  for (; r < num_rows; ++r)
    score_rows<1>(sc.q + std::size_t(r) * sc.ld, sc.ld, sc.kt, head_dim, sc.s + r * kKeyTile);
}

// Online softmax over one key tile: masks keys past each row's causal limit, updates the
// running max/sum and leaves probabilities in sc.s and the o rescale factor in sc.alpha.
// `key_limit0` = keys of this tile visible to row 0 (token t sees key_limit0 + t keys).
inline void softmax_tile(Scratch& sc, int num_rows, int group, int key_limit0) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < num_rows; ++r) {
    float* row = sc.s + std::size_t(r) * kKeyTile;
    const int visible = std::clamp(key_limit0 + r / group, 0, kKeyTile);
    for (int k = visible; k < kKeyTile; ++k) row[k] = kNegInf;
    float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
    for (int k = 0; k < kKeyTile; ++k) tile_max = std::max(tile_max, row[k]);
    const float m_new = std::max(sc.m[r], tile_max);
    if (m_new == kNegInf) {  // nothing visible yet: keep o and l as they are
      sc.alpha[r] = 1.0f;
      std::memset(row, 0, sizeof(float) * kKeyTile);
      continue;
    }
    sc.alpha[r] = exp2_nonpositive(sc.m[r] - m_new);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int k = 0; k < kKeyTile; ++k) {
      row[k] = exp2_nonpositive(row[k] - m_new);
      sum += row[k];
    }
    sc.l[r] = sc.l[r] * sc.alpha[r] + sum;
    sc.m[r] = m_new;
  }
}

// o[r, :] = alpha[r] * o[r, :] + p[r, :] @ v for ROWS rows. D > 0: head_dim known at compile
// time, ROWS x D accumulators in registers; D == 0: any head_dim, updated in place.
template <int D, int ROWS>
inline void accumulate_rows(Scratch& sc, int r0, int num_keys, int head_dim) {
  constexpr int kDim = D > 0 ? D : 1;
  float acc[ROWS][kDim];
  float* o = sc.o + std::size_t(r0) * sc.ld;
  const float* pr = sc.s + std::size_t(r0) * kKeyTile;
  const int dim = D > 0 ? D : head_dim;
  for (int r = 0; r < ROWS; ++r) {
    float* dst = D > 0 ? acc[r] : o + std::size_t(r) * sc.ld;
    const float a = sc.alpha[r0 + r];
#pragma omp simd
    for (int d = 0; d < dim; ++d) dst[d] = o[r * sc.ld + d] * a;
  }
  for (int k = 0; k < num_keys; ++k) {
    const float* vrow = sc.v + std::size_t(k) * sc.ld;
    for (int r = 0; r < ROWS; ++r) {
      float* dst = D > 0 ? acc[r] : o + std::size_t(r) * sc.ld;
      const float pk = pr[r * kKeyTile + k];
#pragma omp simd
      for (int d = 0; d < dim; ++d) dst[d] += pk * vrow[d];
    }
  }
  if constexpr (D > 0) {
    for (int r = 0; r < ROWS; ++r) std::memcpy(o + r * sc.ld, acc[r], sizeof(acc[r]));
  }
}

template <int D>
inline void accumulate_tile(Scratch& sc, int num_rows, int num_keys, int head_dim) {
  constexpr int kRows = D > 0 ? std::max(1, 256 / D) : 1;
  int r = 0;
  for (; r + kRows <= num_rows; r += kRows) accumulate_rows<D, kRows>(sc, r, num_keys, head_dim);
  for (; r < num_rows; ++r) accumulate_rows<D, 1>(sc, r, num_keys, head_dim);
}

template <int D, typename T>
void attend_item(const PrefillAttentionParams<T>& p, const WorkItem& w, int kv_head, Scratch& sc) {
  const int group = p.num_heads / p.num_kv_heads;
  const int num_rows = w.num_q * group;
  const int prefix_len = p.prefix_lens != nullptr ? p.prefix_lens[w.seq] : 0;
  if (p.slot_mapping != nullptr) write_item_kv(p, w, kv_head);
  load_query_tile(p, w, kv_head, sc);
  std::fill(sc.m, sc.m + num_rows, -std::numeric_limits<float>::infinity());
  std::fill(sc.l, sc.l + num_rows, 0.0f);
  std::memset(sc.o, 0, sizeof(float) * std::size_t(num_rows) * sc.ld);

  const KeySource<T> keys{p, w.seq, kv_head, prefix_len};
  const int first_pos = prefix_len + w.q_begin;  // absolute position of the tile's row 0
  const int key_end = first_pos + w.num_q;       // the last row sees keys [0, key_end)
  for (int k_begin = 0; k_begin < key_end; k_begin += kKeyTile) {
    const int num_keys = std::min(kKeyTile, key_end - k_begin);
    load_key_value_tile(keys, k_begin, num_keys, sc);
    score_tile(sc, num_rows, p.head_dim);
    softmax_tile(sc, num_rows, group, first_pos + 1 - k_begin);
    accumulate_tile<D>(sc, num_rows, num_keys, p.head_dim);
  }

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
  const int tile_tokens = std::max(1, (kTileRows + group - 1) / group);
  std::vector<WorkItem> items;
  try {
    items = make_work_items(p, tile_tokens);
  } catch (const std::bad_alloc&) {
    return Status::kOutOfMemory;
  }
  const int64_t num_work = int64_t(items.size()) * p.num_kv_heads;
  bool out_of_memory = false;
#pragma omp parallel if (num_work > 1)
  {
    Scratch sc;
    const bool ok = sc.allocate(tile_tokens * group, p.head_dim);
    if (!ok) {
#pragma omp atomic write
      out_of_memory = true;
    }
    // Every thread must reach the worksharing loop; one without scratch takes no items.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_work; ++i) {
      if (ok) attend_item<D>(p, items[i / p.num_kv_heads], int(i % p.num_kv_heads), sc);
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

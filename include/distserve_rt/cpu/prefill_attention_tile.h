// fp32 tile math of the CPU prefill attention (prefill_attention.h): the per-thread scratch,
// the score (QK^T), online-softmax and PV kernels of one (query tile x key tile) step.
//
// Layout choice: the query tile is stored transposed ([head_dim, rows]) and the scores as
// [keys, rows], so QK^T is an outer-product update vectorised over query rows with K rows
// read in their natural [key, head_dim] layout (no per-tile transpose), and the online
// softmax runs down the key axis with one vector lane per query row (no horizontal
// reductions). PV is vectorised over head_dim. Every inner loop is a fixed- or
// runtime-width fp32 loop under `omp simd`, so -march=native picks the vector width.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace drt::cpu::prefill_detail {

constexpr int kKeyTile = 64;   // keys per tile
constexpr int kTileRows = 64;  // query rows (tokens x GQA group) a tile aims for
constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (-inf gives 0). Branch-free so `omp simd` loops vectorise it (libm's exp2f
// does not without -ffast-math, nor does floorf here). 2^x = 2^n * 2^f, n = round(x),
// |f| <= 1/2; degree-7 Taylor series of 2^f: relative error < 1e-8, below fp32 rounding.
// The rounding trick needs IEEE evaluation order: do not build this with -ffast-math.
inline float exp2_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  const float xc = std::max(x, -126.0f);  // also -inf; 2^-126 is within a denormal of 0
  const float n = (xc + kRound) - kRound;
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
  return x < -126.0f ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// Per-thread fp32 scratch, 64-byte aligned. `mp` (the item's rows padded to 16) is the row
// stride of the transposed buffers and varies per work item; `ld` = head_dim padded to 16.
struct Scratch {
  int ld = 0;
  float* base = nullptr;
  float* qt = nullptr;        // [head_dim, mp]   query tile transposed, scaled
  float* k = nullptr;         // [kKeyTile, ld]   prefix key tile (new keys are read packed)
  float* v = nullptr;         // [kKeyTile, ld]   prefix value tile
  float* st = nullptr;        // [kKeyTile, mp]   scores, then probabilities
  float* o = nullptr;         // [mp, ld]         output accumulators
  float* m = nullptr;         // [mp]             running max (log2 domain)
  float* l = nullptr;         // [mp]             running sum
  float* alpha = nullptr;     // [mp]             rescale of o for the current key tile
  float* tile_max = nullptr;  // [mp]
  float* tile_sum = nullptr;  // [mp]
  int* row_token = nullptr;   // [mp]             token of each row within the query tile

  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(base); }

  bool allocate(int max_rows, int head_dim) {
    ld = (head_dim + 15) / 16 * 16;
    const std::size_t mp = (max_rows + 15) / 16 * 16;
    const std::size_t n = mp * ld * 2 + std::size_t(ld) * kKeyTile * 2 + mp * kKeyTile + mp * 6;
    base = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    if (base == nullptr) return false;
    qt = base;
    k = qt + mp * ld;
    v = k + std::size_t(ld) * kKeyTile;
    st = v + std::size_t(ld) * kKeyTile;
    o = st + mp * kKeyTile;
    m = o + mp * ld;
    l = m + mp;
    alpha = l + mp;
    tile_max = alpha + mp;
    tile_sum = tile_max + mp;
    row_token = reinterpret_cast<int*>(tile_sum + mp);
    return true;
  }
};

// st[key, r0 : r0 + 16 * NV] = k[key, :] . qt[:, r0 : ...] for keys [0, num_keys) (a multiple
// of 4), 4 keys at a time: 4 x NV 16-float accumulators stay in registers.
template <int NV>
inline void score_keys(Scratch& sc, int mp, int r0, const float* k, int num_keys, int head_dim) {
  constexpr int kRows = 16 * NV;
  for (int k0 = 0; k0 < num_keys; k0 += 4) {
    float acc[4][kRows] = {};
    const float* krows = k + std::size_t(k0) * sc.ld;  // [4, ld]
    for (int d = 0; d < head_dim; ++d) {
      const float* qrow = sc.qt + std::size_t(d) * mp + r0;
      for (int kk = 0; kk < 4; ++kk) {
        const float kd = krows[kk * sc.ld + d];
#pragma omp simd
        for (int r = 0; r < kRows; ++r) acc[kk][r] += kd * qrow[r];
      }
    }
    for (int kk = 0; kk < 4; ++kk)
      std::memcpy(sc.st + std::size_t(k0 + kk) * mp + r0, acc[kk], sizeof(acc[kk]));
  }
}

// Scores of all mp rows against `num_keys` key rows of `k` ([>= round_up(num_keys, 4), ld]).
inline void score_tile(Scratch& sc, int mp, const float* k, int num_keys, int head_dim) {
  const int num_keys4 = (num_keys + 3) / 4 * 4;
  for (int r0 = 0; r0 < mp; r0 += 64) {
    switch (std::min(4, (mp - r0) / 16)) {
      case 4:
        score_keys<4>(sc, mp, r0, k, num_keys4, head_dim);
        break;
      case 3:
        score_keys<3>(sc, mp, r0, k, num_keys4, head_dim);
        break;
      case 2:
        score_keys<2>(sc, mp, r0, k, num_keys4, head_dim);
        break;
      default:
        score_keys<1>(sc, mp, r0, k, num_keys4, head_dim);
    }
  }
}

// Online softmax over one key tile: masks keys past each row's causal limit when the tile
// crosses the diagonal, updates the running max/sum, leaves probabilities in sc.st and the
// o rescale factor in sc.alpha. Row r sees the first key_limit0 + row_token[r] keys.
inline void softmax_tile(Scratch& sc, int mp, int num_keys, int key_limit0) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Local copies: GCC does not vectorise loops that reload the members after each store.
  float* m = sc.m;                // [mp]
  float* l = sc.l;                // [mp]
  float* alpha = sc.alpha;        // [mp]
  float* tile_max = sc.tile_max;  // [mp]
  float* tile_sum = sc.tile_sum;  // [mp]
  const int* row_token = sc.row_token;
  const bool crosses_diagonal = num_keys > key_limit0;
  std::fill(tile_max, tile_max + mp, kNegInf);
  std::fill(tile_sum, tile_sum + mp, 0.0f);
  for (int k = 0; k < num_keys; ++k) {
    float* row = sc.st + std::size_t(k) * mp;  // [mp]
    if (crosses_diagonal) {
      const int hidden_below = k - key_limit0;  // row r sees key k iff row_token[r] > this
#pragma omp simd
      for (int r = 0; r < mp; ++r) row[r] = row_token[r] > hidden_below ? row[r] : kNegInf;
    }
#pragma omp simd
    for (int r = 0; r < mp; ++r) tile_max[r] = std::max(tile_max[r], row[r]);
  }
#pragma omp simd
  for (int r = 0; r < mp; ++r) {
    const float m_new = std::max(m[r], tile_max[r]);
    // A row that has seen no key yet keeps m = -inf; subtracting 0 then gives p = 0.
    const float m_safe = m_new == kNegInf ? 0.0f : m_new;
    alpha[r] = exp2_nonpositive(m[r] - m_safe);
    m[r] = m_new;
    tile_max[r] = m_safe;
  }
  for (int k = 0; k < num_keys; ++k) {
    float* row = sc.st + std::size_t(k) * mp;  // [mp]
#pragma omp simd
    for (int r = 0; r < mp; ++r) {
      row[r] = exp2_nonpositive(row[r] - tile_max[r]);
      tile_sum[r] += row[r];
    }
  }
#pragma omp simd
  for (int r = 0; r < mp; ++r) l[r] = l[r] * alpha[r] + tile_sum[r];
}

// o[r, :] = alpha[r] * o[r, :] + sum_k st[k, r] * v[k, :] for ROWS rows. D > 0: head_dim
// known at compile time, ROWS x D accumulators in registers; D == 0: any head_dim, in place.
template <int D, int ROWS>
inline void accumulate_rows(Scratch& sc, int mp, int r0, const float* v, int num_keys,
                            int head_dim) {
  constexpr int kDim = D > 0 ? D : 1;
  float acc[ROWS][kDim];
  float* o = sc.o + std::size_t(r0) * sc.ld;  // [ROWS, ld]
  const int dim = D > 0 ? D : head_dim;
  for (int r = 0; r < ROWS; ++r) {
    float* dst = D > 0 ? acc[r] : o + std::size_t(r) * sc.ld;
    const float a = sc.alpha[r0 + r];
#pragma omp simd
    for (int d = 0; d < dim; ++d) dst[d] = o[r * sc.ld + d] * a;
  }
  for (int k = 0; k < num_keys; ++k) {
    const float* vrow = v + std::size_t(k) * sc.ld;
    const float* pk = sc.st + std::size_t(k) * mp + r0;
    for (int r = 0; r < ROWS; ++r) {
      float* dst = D > 0 ? acc[r] : o + std::size_t(r) * sc.ld;
      const float pr = pk[r];
#pragma omp simd
      for (int d = 0; d < dim; ++d) dst[d] += pr * vrow[d];
    }
  }
  if constexpr (D > 0) {
    for (int r = 0; r < ROWS; ++r) std::memcpy(o + r * sc.ld, acc[r], sizeof(acc[r]));
  }
}

// PV for the item's real rows (padding rows' outputs are never read); v: [num_keys, ld].
template <int D>
inline void accumulate_tile(Scratch& sc, int mp, int num_rows, const float* v, int num_keys,
                            int head_dim) {
  constexpr int kRows = D > 0 ? std::max(1, 256 / D) : 1;
  int r = 0;
  for (; r + kRows <= num_rows; r += kRows)
    accumulate_rows<D, kRows>(sc, mp, r, v, num_keys, head_dim);
  for (; r < num_rows; ++r) accumulate_rows<D, 1>(sc, mp, r, v, num_keys, head_dim);
}

}  // namespace drt::cpu::prefill_detail

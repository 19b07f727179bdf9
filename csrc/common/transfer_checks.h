// Argument checks of the transfer engines' submit (CPU shm worker and CUDA IPC), shared so
// that both raise the same ValueErrors before anything is queued or copied. Plain C++17
// without pybind11: included from host code of both modules.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/launcher.h"
#include "distserve_rt/transfer/block_slice.h"

namespace drt::transfer {

// (num_blocks, num_layers, num_kv_heads, block_stride_bytes), as Python passes it.
using PoolTuple = std::array<int64_t, 4>;
// (src_layer_start, dst_layer_start, num_layers, src_head_start, dst_head_start, num_heads).
using SliceTuple = std::array<int64_t, 6>;

inline PoolGeometry to_geometry(const PoolTuple& t, const char* name) {
  check_arg(t[0] >= 1 && t[1] >= 1 && t[2] >= 1, name, " pool must have num_blocks, ",
            "num_layers and num_kv_heads >= 1, got (", t[0], ", ", t[1], ", ", t[2], ")");
  return {t[0], t[1], t[2], t[3]};
}

inline KVSliceSpec to_slice(const SliceTuple& t) { return {t[0], t[1], t[2], t[3], t[4], t[5]}; }

// Geometry rules with messages naming the bad value (slice_params_valid is the guard).
inline void check_slice_params(const SliceCopyParams& p) {
  const KVSliceSpec& s = p.slice;
  check_arg(p.head_bytes >= 1, "head_bytes must be >= 1, got ", p.head_bytes);
  check_arg(s.num_layers >= 1 && s.num_heads >= 1, "the slice must move >= 1 layer and head, ",
            "got num_layers=", s.num_layers, ", num_heads=", s.num_heads);
  check_arg(s.src_layer_start >= 0 && s.src_layer_start + s.num_layers <= p.src_pool.num_layers,
            "source layers [", s.src_layer_start, ", ", s.src_layer_start + s.num_layers,
            ") are outside the source pool's ", p.src_pool.num_layers, " layers");
  check_arg(s.dst_layer_start >= 0 && s.dst_layer_start + s.num_layers <= p.dst_pool.num_layers,
            "destination layers [", s.dst_layer_start, ", ", s.dst_layer_start + s.num_layers,
            ") are outside the destination pool's ", p.dst_pool.num_layers, " layers");
  check_arg(s.src_head_start >= 0 && s.src_head_start + s.num_heads <= p.src_pool.num_kv_heads,
            "source heads [", s.src_head_start, ", ", s.src_head_start + s.num_heads,
            ") are outside the source pool's ", p.src_pool.num_kv_heads, " KV heads");
  check_arg(s.dst_head_start >= 0 && s.dst_head_start + s.num_heads <= p.dst_pool.num_kv_heads,
            "destination heads [", s.dst_head_start, ", ", s.dst_head_start + s.num_heads,
            ") are outside the destination pool's ", p.dst_pool.num_kv_heads, " KV heads");
  for (const PoolGeometry* pool : {&p.src_pool, &p.dst_pool}) {
    const int64_t block_bytes = pool->num_layers * 2 * pool->num_kv_heads * p.head_bytes;
    check_arg(pool->block_stride_bytes >= block_bytes, pool == &p.src_pool ? "source" : "dest",
              " block_stride_bytes (", pool->block_stride_bytes, ") must be >= the block's ",
              block_bytes, " bytes");
  }
}

// Ids in range and each destination block written at most once. Runs on the submitting
// thread, so a bad batch raises before it is queued and nothing is copied.
inline void check_transfer_mapping(const int64_t* mapping, int64_t num_pairs,
                                   int64_t src_num_blocks, int64_t dst_num_blocks) {
  check_arg(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  std::vector<std::pair<int64_t, int64_t>> writes;  // [num_pairs] (dst block, pair)
  writes.reserve(static_cast<std::size_t>(num_pairs));
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t s = mapping[2 * i];
    const int64_t d = mapping[2 * i + 1];
    check_arg(s >= 0 && s < src_num_blocks, "src block id ", s, " (pair ", i,
              ") is out of range: the source pool has ", src_num_blocks, " blocks");
    check_arg(d >= 0 && d < dst_num_blocks, "dst block id ", d, " (pair ", i,
              ") is out of range: the destination pool has ", dst_num_blocks, " blocks");
    writes.emplace_back(d, i);
  }
  std::sort(writes.begin(), writes.end());
  for (std::size_t k = 1; k < writes.size(); ++k) {
    check_arg(writes[k].first != writes[k - 1].first, "pairs ", writes[k - 1].second, " and ",
              writes[k].second, " both write dst block ", writes[k].first,
              "; each dst block may be written at most once per transfer");
  }
}

}  // namespace drt::transfer

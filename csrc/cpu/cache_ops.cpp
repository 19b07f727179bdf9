// Launchers and bindings of the cache ops (write_kv, copy_blocks) of the CPU module.
// The launchers check every value a caller can get wrong, including the data-dependent ones
// (slot and block ids: a cheap host loop on CPU), name the bad one in a ValueError, then run
// the kernels of include/distserve_rt/cpu/cache.h with the GIL released.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "common/launcher.h"
#include "common/op_bindings.h"
#include "common/shape_checks.h"
#include "common/slot_mapping_checks.h"
#include "cpu/threads.h"
#include "distserve_rt/cpu/cache.h"
#include "distserve_rt/cpu/dtype.h"

namespace py = pybind11;

namespace {

using drt::check_arg;
using drt::check_slot_mapping;

void write_kv(const drt::WriteKVArgs& a) {
  drt::cpu::apply_num_threads();
  const drt::DType dtype = drt::to_dtype(a.dtype);
  drt::check_write_kv_shapes(a);
  if (a.num_tokens == 0) return;
  // A pool of zero blocks has a null data pointer; then every slot must be padding (checked
  // below against num_slots = 0) and the cache is never touched.
  check_arg(
      a.key != 0 && a.value != 0 && a.slot_mapping != 0 && (a.kv_cache != 0 || a.num_blocks == 0),
      "key, value, kv_cache and slot_mapping must be non-null pointers");

  drt::cpu::WriteKVParams params{};
  params.key = drt::as_ptr<const void>(a.key);
  params.value = drt::as_ptr<const void>(a.value);
  params.kv_cache = drt::as_ptr<void>(a.kv_cache);
  params.slot_mapping = drt::as_ptr<const int64_t>(a.slot_mapping);
  params.num_tokens = a.num_tokens;
  params.num_kv_heads = a.num_kv_heads;
  params.head_dim = a.head_dim;
  params.key_token_stride = a.key_token_stride;
  params.value_token_stride = a.value_token_stride;
  params.num_blocks = a.num_blocks;
  params.block_size = a.block_size;
  params.kv_block_stride = a.kv_block_stride;
  py::gil_scoped_release no_gil;
  check_slot_mapping(params.slot_mapping, a.num_tokens, a.num_blocks * a.block_size);
  const drt::Status status =
      DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t, [&] { return drt::cpu::write_kv<scalar_t>(params); });
  drt::throw_if_error(status, "write_kv");
}

std::uintptr_t block_address(std::uintptr_t base, int64_t block, int64_t stride_bytes) {
  return base + static_cast<std::uintptr_t>(block) * static_cast<std::uintptr_t>(stride_bytes);
}

// When src and dst share memory, no pair may read bytes that another (or the same) pair
// writes: the copy order would decide the result. `writes` = (dst block, pair) sorted by
// block, hence by address, and disjoint (distinct blocks, stride >= block_bytes).
void check_no_read_of_written(const drt::cpu::CopyBlocksParams& p,
                              const std::vector<std::pair<int64_t, int64_t>>& writes) {
  const auto src = reinterpret_cast<std::uintptr_t>(p.src);
  const auto dst = reinterpret_cast<std::uintptr_t>(p.dst);
  const auto bytes = static_cast<std::uintptr_t>(p.block_bytes);
  const std::uintptr_t src_end = block_address(src, p.src_num_blocks - 1, p.src_block_stride_bytes);
  const std::uintptr_t dst_end = block_address(dst, p.dst_num_blocks - 1, p.dst_block_stride_bytes);
  if (src >= dst_end + bytes || dst >= src_end + bytes) return;  // separate allocations
  std::vector<std::uintptr_t> write_begin;                       // [num_pairs] sorted
  write_begin.reserve(writes.size());
  for (const auto& w : writes) {
    write_begin.push_back(block_address(dst, w.first, p.dst_block_stride_bytes));
  }
  for (int64_t i = 0; i < p.num_pairs; ++i) {
    const int64_t src_block = p.block_mapping[2 * i];
    const std::uintptr_t read_begin = block_address(src, src_block, p.src_block_stride_bytes);
    // The write starting last before the read ends is the only one that can reach into it.
    const auto after = std::lower_bound(write_begin.begin(), write_begin.end(), read_begin + bytes);
    if (after == write_begin.begin()) continue;
    const auto k = static_cast<std::size_t>(after - write_begin.begin() - 1);
    check_arg(write_begin[k] + bytes <= read_begin, "block_mapping[", i, "] reads src block ",
              src_block, " while block_mapping[", writes[k].second, "] writes dst block ",
              writes[k].first, " over the same memory (src and dst share one pool); a block ",
              "both read and written in one call would make the result depend on copy order");
  }
}

// Ids in range, each dst block written once, and no block both read and written.
void check_block_mapping(const drt::cpu::CopyBlocksParams& p) {
  std::vector<std::pair<int64_t, int64_t>> writes;  // [num_pairs] (dst block, pair)
  writes.reserve(static_cast<std::size_t>(p.num_pairs));
  for (int64_t i = 0; i < p.num_pairs; ++i) {
    const int64_t src_block = p.block_mapping[2 * i];
    const int64_t dst_block = p.block_mapping[2 * i + 1];
    check_arg(src_block >= 0 && src_block < p.src_num_blocks, "block_mapping[", i, "] = (",
              src_block, ", ", dst_block, "): src block ", src_block, " is out of range [0, ",
              p.src_num_blocks, ")");
    check_arg(dst_block >= 0 && dst_block < p.dst_num_blocks, "block_mapping[", i, "] = (",
              src_block, ", ", dst_block, "): dst block ", dst_block, " is out of range [0, ",
              p.dst_num_blocks, ")");
    writes.emplace_back(dst_block, i);
  }
  std::sort(writes.begin(), writes.end());
  for (std::size_t k = 1; k < writes.size(); ++k) {
    check_arg(writes[k].first != writes[k - 1].first, "block_mapping[", writes[k - 1].second,
              "] and block_mapping[", writes[k].second, "] both write dst block ", writes[k].first,
              "; each dst block may be written at most once per call");
  }
  if (p.block_bytes > 0) check_no_read_of_written(p, writes);
}

void copy_blocks(const drt::CopyBlocksArgs& a) {
  drt::cpu::apply_num_threads();
  drt::check_copy_blocks_shapes(a);
  if (a.num_pairs == 0) return;
  check_arg(a.src != 0 && a.dst != 0 && a.block_mapping != 0,
            "src, dst and block_mapping must be non-null pointers");

  drt::cpu::CopyBlocksParams params{};
  params.src = drt::as_ptr<const void>(a.src);
  params.dst = drt::as_ptr<void>(a.dst);
  params.block_mapping = drt::as_ptr<const int64_t>(a.block_mapping);
  params.num_pairs = a.num_pairs;
  params.src_num_blocks = a.src_num_blocks;
  params.dst_num_blocks = a.dst_num_blocks;
  params.src_block_stride_bytes = a.src_block_stride_bytes;
  params.dst_block_stride_bytes = a.dst_block_stride_bytes;
  params.block_bytes = a.block_bytes;
  py::gil_scoped_release no_gil;
  check_block_mapping(params);
  drt::throw_if_error(drt::cpu::copy_blocks(params), "copy_blocks");
}

}  // namespace

void register_cache_ops(py::module_& m) {
  drt::bindings::def_op(
      m, "write_kv", drt::bindings::kWriteKVFields,
      "Scatters key/value [num_tokens, num_kv_heads, head_dim] into one layer's kv_cache "
      "[num_blocks, 2, num_kv_heads, block_size, head_dim] at slot_mapping (int64, < 0 = "
      "padding). Pointers are ints, strides in elements.",
      &write_kv);
  drt::bindings::def_op(
      m, "copy_blocks", drt::bindings::kCopyBlocksFields,
      "Copies block_bytes from src block s to dst block d for every row (s, d) of "
      "block_mapping (int64 [num_pairs, 2]). Pointers are ints, strides in bytes.",
      &copy_blocks);
}

// Launcher of the CPU prefill attention (include/distserve_rt/cpu/prefill_attention.h):
// checks every argument, including the data-dependent ones (cu_seqlens, prefix_lens, block
// ids, slot ids: a cheap host loop here, so the kernel never reads or writes out of bounds),
// dispatches on dtype and runs the kernel without the GIL.
#include "distserve_rt/cpu/prefill_attention.h"

#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>

#include "common/launcher.h"
#include "common/op_bindings.h"
#include "common/shape_checks.h"
#include "common/slot_mapping_checks.h"
#include "cpu/threads.h"

namespace py = pybind11;

namespace {

using PrefillArgs = drt::PrefillAttentionArgs;

// The rules shared with the CUDA launcher (common/shape_checks.h), then this backend's own:
// its head_dim limit and the pointers it reads.
void check_shapes(const PrefillArgs& a) {
  using drt::check_arg;
  drt::check_prefill_shapes(a);
  check_arg(a.head_dim <= drt::cpu::kMaxHeadDim, "head_dim must be in [1, ", drt::cpu::kMaxHeadDim,
            "], got ", a.head_dim);
  // Empty tensors have null data pointers: a batch with no new tokens is valid (and a no-op).
  check_arg(a.cu_seqlens != 0, "cu_seqlens must be a non-null pointer");
  check_arg(a.num_tokens == 0 || (a.query != 0 && a.key != 0 && a.value != 0 && a.out != 0),
            "query, key, value and out must be non-null pointers");
}

void check_cu_seqlens(const PrefillArgs& a) {
  using drt::check_arg;
  const auto* cu_seqlens = drt::as_ptr<const int32_t>(a.cu_seqlens);  // [batch + 1]
  check_arg(cu_seqlens[0] == 0, "cu_seqlens[0] must be 0, got ", cu_seqlens[0]);
  for (int64_t i = 0; i < a.batch; ++i) {
    const int64_t seq_len = int64_t(cu_seqlens[i + 1]) - cu_seqlens[i];
    check_arg(seq_len >= 0, "cu_seqlens must be non-decreasing, got cu_seqlens[", i,
              "] = ", cu_seqlens[i], " > cu_seqlens[", i + 1, "] = ", cu_seqlens[i + 1]);
    check_arg(seq_len <= a.max_seqlen_q, "sequence ", i, " has ", seq_len,
              " tokens, more than max_seqlen_q = ", a.max_seqlen_q);
  }
  check_arg(cu_seqlens[a.batch] == a.num_tokens, "cu_seqlens[batch] = ", cu_seqlens[a.batch],
            " must equal num_tokens = ", a.num_tokens);
}

void check_prefix(const PrefillArgs& a) {
  using drt::check_arg;
  if (a.prefix_lens == 0) return;
  const auto* cu_seqlens = drt::as_ptr<const int32_t>(a.cu_seqlens);    // [batch + 1]
  const auto* prefix_lens = drt::as_ptr<const int32_t>(a.prefix_lens);  // [batch]
  const auto* block_table = drt::as_ptr<const int32_t>(a.block_table);
  // block_table: [batch, max_blocks_per_seq]
  const int64_t capacity = a.max_blocks_per_seq * a.block_size;
  for (int64_t i = 0; i < a.batch; ++i) {
    const int64_t prefix_len = prefix_lens[i];
    const int64_t seq_len = int64_t(cu_seqlens[i + 1]) - cu_seqlens[i];
    check_arg(prefix_len >= 0, "prefix_lens[", i, "] must be >= 0, got ", prefix_len);
    // The kernel keeps token positions in int.
    check_arg(prefix_len + seq_len <= INT32_MAX, "sequence ", i, ": prefix_lens[", i,
              "] + new tokens = ", prefix_len + seq_len, " exceeds INT32_MAX positions");
    check_arg(prefix_len + seq_len <= capacity, "sequence ", i, ": prefix_lens[", i,
              "] + new tokens = ", prefix_len, " + ", seq_len, " exceeds max_blocks_per_seq (",
              a.max_blocks_per_seq, ") * block_size (", a.block_size, ") = ", capacity);
    const int64_t num_prefix_blocks = (prefix_len + a.block_size - 1) / a.block_size;
    for (int64_t b = 0; b < num_prefix_blocks; ++b) {
      const int32_t block = block_table[i * a.max_blocks_per_seq + b];
      check_arg(block >= 0 && block < a.num_blocks, "block_table[", i, "][", b, "] = ", block,
                " is out of range [0, num_blocks = ", a.num_blocks, ")");
    }
  }
}

void check_slot_mapping(const PrefillArgs& a) {
  if (a.slot_mapping == 0) return;
  drt::check_slot_mapping(drt::as_ptr<const int64_t>(a.slot_mapping),  // [num_tokens]
                          a.num_tokens, a.num_blocks * a.block_size);
}

// Sizes narrowed to int where the kernel keeps them so (check_shapes bounded them).
template <typename T>
drt::cpu::PrefillAttentionParams<T> make_params(const PrefillArgs& a) {
  using drt::as_ptr;
  drt::cpu::PrefillAttentionParams<T> p{};
  p.query = as_ptr<const T>(a.query);
  p.key = as_ptr<const T>(a.key);
  p.value = as_ptr<const T>(a.value);
  p.out = as_ptr<T>(a.out);
  p.cu_seqlens = as_ptr<const int32_t>(a.cu_seqlens);
  p.batch = int(a.batch);
  p.num_tokens = int(a.num_tokens);
  p.num_heads = int(a.num_heads);
  p.num_kv_heads = int(a.num_kv_heads);
  p.head_dim = int(a.head_dim);
  p.query_token_stride = a.query_token_stride;
  p.key_token_stride = a.key_token_stride;
  p.value_token_stride = a.value_token_stride;
  p.out_token_stride = a.out_token_stride;
  p.softmax_scale = float(a.softmax_scale);
  p.kv_cache = as_ptr<T>(a.kv_cache);
  p.block_table = as_ptr<const int32_t>(a.block_table);
  p.prefix_lens = as_ptr<const int32_t>(a.prefix_lens);
  p.slot_mapping = as_ptr<const int64_t>(a.slot_mapping);
  p.block_size = int(a.block_size);
  p.kv_block_stride = a.kv_block_stride;
  p.max_blocks_per_seq = int(a.max_blocks_per_seq);
  return p;
}

void prefill_attention(const PrefillArgs& a) {
  drt::cpu::apply_num_threads();
  const drt::DType dtype = drt::to_dtype(a.dtype);
  check_shapes(a);
  check_cu_seqlens(a);
  check_prefix(a);
  check_slot_mapping(a);
  if (a.num_tokens == 0) return;  // every sequence empty: nothing to attend or write
  drt::Status status;
  {
    py::gil_scoped_release no_gil;
    status = DRT_CPU_DISPATCH_DTYPE(
        dtype, scalar_t, [&] { return drt::cpu::prefill_attention(make_params<scalar_t>(a)); });
  }
  drt::throw_if_error(status, "prefill_attention");
}

}  // namespace

void register_prefill_attention(py::module_& m) {
  drt::bindings::def_op(
      m, "prefill_attention", drt::bindings::kPrefillAttentionFields,
      "Causal varlen prefill attention (GQA, optional paged prefix and fused K/V write). "
      "Pointers are ints, strides in elements; see distserve_rt.ops.prefill_attention.",
      &prefill_attention);
}

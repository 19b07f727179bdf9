// `distserve_rt._cuda_emu`: the CUDA module's kernels and launchers (csrc/cuda/*.cu,
// include/distserve_rt/cuda/*.cuh) compiled for the host and run by the CPU emulator of
// the CUDA execution model (csrc/cuda_emu/README.md). The ops take `_cuda`'s keywords
// (common/op_bindings.h) with `stream` accepted and ignored, and run on host memory.
// Also: the block-slice transfer kernel as an op (in `_cuda` it is reached through
// IpcTransferEngine), guarded buffers, the warp order, and the harness's test kernels.
// The GIL stays held: the emulator is one global machine.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/launcher.h"
#include "common/op_bindings.h"
#include "cuda/ops.h"
#include "cuda/transfer.h"
#include "cuda_emu/emu_internal.h"
#include "cuda_emu/harness.h"
#include "cuda_emu/scheduler.h"

namespace py = pybind11;
namespace ops = drt::cuda_ops;
using drt::bindings::def_op;
using py::arg;

namespace {

// A host buffer whose last byte sits against an inaccessible page (memory.cpp); Python
// wraps it with torch.frombuffer, which keeps it alive as long as the tensor.
class GuardedBuffer {
 public:
  GuardedBuffer(int64_t nbytes, int64_t alignment) : nbytes_(nbytes) {
    drt::check_arg(nbytes >= 1, "nbytes must be >= 1, got ", nbytes);
    drt::check_arg(alignment >= 1 && alignment <= 4096 && (alignment & (alignment - 1)) == 0,
                   "alignment must be a power of two in [1, 4096], got ", alignment);
    data_ = drt_emu::guarded_alloc(static_cast<size_t>(nbytes), static_cast<size_t>(alignment),
                                   drt_emu::RegionKind::kGlobal);
  }
  ~GuardedBuffer() { drt_emu::guarded_free(data_); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  py::buffer_info info() {
    return py::buffer_info(data_, 1, py::format_descriptor<uint8_t>::format(), nbytes_);
  }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data_); }

 private:
  void* data_;
  int64_t nbytes_;
};

drt_emu::WarpOrder parse_order(const std::string& order) {
  if (order == "forward") return drt_emu::WarpOrder::kForward;
  if (order == "reverse") return drt_emu::WarpOrder::kReverse;
  if (order == "random") return drt_emu::WarpOrder::kRandom;
  throw std::invalid_argument("order must be one of 'forward', 'reverse', 'random', got '" + order +
                              "'");
}

template <typename Args>
auto ignoring_stream(void (*launch)(const Args&, std::uintptr_t)) {
  return [launch](const Args& args, std::uintptr_t) { launch(args, 0); };
}

void copy_block_slices(uintptr_t src, uintptr_t dst, uintptr_t block_mapping, int64_t num_pairs,
                       const py::tuple& src_pool, const py::tuple& dst_pool, int64_t head_bytes,
                       const py::tuple& slice, uintptr_t /*stream*/) {
  drt::check_arg(src_pool.size() == 4 && dst_pool.size() == 4,
                 "src_pool and dst_pool must be (num_blocks, num_layers, num_kv_heads, "
                 "block_stride_bytes)");
  drt::check_arg(slice.size() == 6,
                 "slice must be (src_layer_start, dst_layer_start, num_layers, "
                 "src_head_start, dst_head_start, num_heads)");
  drt::transfer::SliceCopyParams p{};
  p.src = reinterpret_cast<const char*>(src);
  p.dst = reinterpret_cast<char*>(dst);
  p.block_mapping = reinterpret_cast<const int64_t*>(block_mapping);
  p.num_pairs = num_pairs;
  auto pool = [](const py::tuple& t) {
    return drt::transfer::PoolGeometry{t[0].cast<int64_t>(), t[1].cast<int64_t>(),
                                       t[2].cast<int64_t>(), t[3].cast<int64_t>()};
  };
  p.src_pool = pool(src_pool);
  p.dst_pool = pool(dst_pool);
  p.head_bytes = head_bytes;
  p.slice = {slice[0].cast<int64_t>(), slice[1].cast<int64_t>(), slice[2].cast<int64_t>(),
             slice[3].cast<int64_t>(), slice[4].cast<int64_t>(), slice[5].cast<int64_t>()};
  drt::check_arg(drt::transfer::slice_params_valid(p), "the slice leaves a pool or is empty");
  drt::check_arg(num_pairs == 0 || (src != 0 && dst != 0 && block_mapping != 0),
                 "src, dst and block_mapping must be non-null when num_pairs > 0");
  if (ops::launch_block_slices(p, nullptr) != cudaSuccess) {
    throw std::runtime_error("block-slice kernel launch failed");
  }
}

void register_ops(py::module_& m) {
  def_op(m, "write_kv", drt::bindings::kWriteKVFields, "_cuda.write_kv, emulated on CPU.",
         ignoring_stream(&ops::write_kv), "stream");
  def_op(m, "copy_blocks", drt::bindings::kCopyBlocksFields,
         "_cuda.copy_blocks, emulated on CPU (block_mapping in host memory).",
         ignoring_stream(&ops::copy_blocks), "stream");
  def_op(m, "prefill_attention", drt::bindings::kPrefillAttentionFields,
         "_cuda.prefill_attention, emulated on CPU.", ignoring_stream(&ops::prefill_attention),
         "stream");
  def_op(
      m, "decode_attention_workspace_bytes", drt::bindings::kDecodeWorkspaceFields,
      "_cuda.decode_attention_workspace_bytes.",
      [](const drt::DecodeWorkspaceArgs& args, std::uintptr_t) {
        return ops::decode_attention_workspace_bytes(args);
      },
      "stream");
  def_op(m, "decode_attention", drt::bindings::kDecodeAttentionFields,
         "_cuda.decode_attention, emulated on CPU.", ignoring_stream(&ops::decode_attention),
         "stream");
  m.def("copy_block_slices", &copy_block_slices,
        "The cuda_ipc backend's block-slice kernel: pools are (num_blocks, num_layers, "
        "num_kv_heads, block_stride_bytes), slice (src_layer_start, dst_layer_start, "
        "num_layers, src_head_start, dst_head_start, num_heads); block_mapping int64 "
        "[num_pairs, 2].",
        py::kw_only(), arg("src"), arg("dst"), arg("block_mapping"), arg("num_pairs"),
        arg("src_pool"), arg("dst_pool"), arg("head_bytes"), arg("slice"), arg("stream"));
}

void register_emulator(py::module_& m) {
  py::class_<GuardedBuffer>(m, "GuardedBuffer", py::buffer_protocol())
      .def_buffer(&GuardedBuffer::info)
      .def_property_readonly("address", &GuardedBuffer::address);
  m.def(
      "alloc",
      [](int64_t nbytes, int64_t alignment) { return new GuardedBuffer(nbytes, alignment); },
      "nbytes of host memory whose end (rounded up to `alignment`) touches an inaccessible "
      "page: a kernel reading or writing past it raises at once.",
      py::kw_only(), arg("nbytes"), arg("alignment") = 16);
  m.def(
      "set_warp_order",
      [](const std::string& order, uint64_t seed) {
        drt_emu::set_warp_order(parse_order(order), seed);
      },
      "Order warps run in between barriers: 'forward', 'reverse' or 'random' (from seed).",
      py::kw_only(), arg("order"), arg("seed") = 0);
}

void register_harness(py::module_& m) {
  namespace h = drt_emu::harness;
  auto ptr = [](uintptr_t p) { return reinterpret_cast<void*>(p); };
  m.def("harness_missing_arrival",
        [=](uintptr_t out) { h::missing_arrival(static_cast<int*>(ptr(out))); });
  m.def("harness_divergent_barrier",
        [=](uintptr_t out) { h::divergent_barrier(static_cast<int*>(ptr(out))); });
  m.def("harness_missing_lane",
        [=](uintptr_t out) { h::missing_lane(static_cast<float*>(ptr(out))); });
  m.def("harness_cp_async_then_read", [=](uintptr_t src, uintptr_t out, bool wait) {
    h::cp_async_then_read(static_cast<const float*>(ptr(src)), static_cast<float*>(ptr(out)), wait);
  });
  m.def("harness_unsynchronised_read",
        [=](uintptr_t out) { h::unsynchronised_read(static_cast<float*>(ptr(out))); });
  m.def("harness_vector_read", [=](uintptr_t src, int offset, uintptr_t out) {
    h::vector_read(static_cast<const char*>(ptr(src)), offset, static_cast<uint4*>(ptr(out)));
  });
  m.def("harness_bounded",
        [=](uintptr_t out, int threads) { h::bounded(static_cast<int*>(ptr(out)), threads); });
  m.def("harness_mma", [=](bool bf16, uintptr_t a, uintptr_t b_nk, uintptr_t b_kn, uintptr_t d_nk,
                           uintptr_t d_kn) {
    h::mma(bf16, ptr(a), ptr(b_nk), ptr(b_kn), static_cast<float*>(ptr(d_nk)),
           static_cast<float*>(ptr(d_kn)));
  });
  m.def("harness_syncwarp_missing_lane",
        [=](uintptr_t out) { h::syncwarp_missing_lane(static_cast<float*>(ptr(out))); });
  m.def("harness_copy", [=](uintptr_t src, uintptr_t out, int64_t n) {
    h::copy(static_cast<const float*>(ptr(src)), static_cast<float*>(ptr(out)), n);
  });
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "distserve_rt's CUDA kernels run by a CPU emulation of the CUDA execution model";
  register_ops(m);
  register_emulator(m);
  register_harness(m);
}

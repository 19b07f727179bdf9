// The CPU module `distserve_rt._C`: one registration function per op family, each in its
// own binding file beside this one.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/threads.h"

namespace py = pybind11;

void register_cache_ops(py::module_& m);          // cache_ops.cpp: write_kv, copy_blocks
void register_prefill_attention(py::module_& m);  // prefill_attention.cpp
void register_decode_attention(py::module_& m);   // decode_attention.cpp
void register_block_manager(py::module_& m);      // block_manager.cpp
void register_transfer(py::module_& m);           // transfer_shm.cpp: ShmTransferEngine
void register_layer_ops(py::module_& m);  // layer_ops.cpp: linear, rms_norm, silu_and_mul, rotary

PYBIND11_MODULE(_C, m) {
  m.doc() = "distserve_rt CPU kernels and block manager";
  // Kernels use OpenMP over the threads set here, from whichever thread calls them
  // (threads.h); default: OMP_NUM_THREADS or all cores.
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
    drt::cpu::configured_num_threads().store(n);
  });
  m.def("get_num_threads", []() { return drt::cpu::effective_num_threads(); });
  register_cache_ops(m);
  register_prefill_attention(m);
  register_decode_attention(m);
  register_block_manager(m);
  register_transfer(m);
  register_layer_ops(m);
}

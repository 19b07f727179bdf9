// The CUDA module `distserve_rt._cuda`. Bindings are compiled by the host compiler; kernels
// live in .cu files that expose plain C++ launchers (no pybind11 through nvcc).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "distserve_rt CUDA kernels";
  // Number of visible devices; 0 (not an error) when there is no driver or no device, so
  // callers can probe without a GPU.
  m.def("device_count", []() {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return count;
  });
}

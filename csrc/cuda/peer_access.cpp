// Peer-to-peer access between GPUs and the pointer checks built on it (host code only).
// One H200 has no peer, so these paths are written and compiled but raise a clear error
// where no peer path exists instead of letting a kernel fault.
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common/launcher.h"
#include "cuda/cuda_utils.h"
#include "cuda/ops.h"
#include "cuda/pointer_checks.h"

namespace drt::cuda_ops {
namespace {

std::string hex(std::uintptr_t address) {
  std::ostringstream out;
  out << "0x" << std::hex << address;
  return out.str();
}

cudaPointerAttributes pointer_attributes(std::uintptr_t address, const char* name) {
  cudaPointerAttributes attr{};
  check_cuda(cudaPointerGetAttributes(&attr, as_ptr<const void>(address)),
             std::string("cudaPointerGetAttributes(") + name + ")");
  return attr;
}

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
}

void check_device_index(int64_t device, const char* name, int count) {
  check_arg(device >= 0 && device < count, name, " must be in [0, ", count, "), got ", device);
}

}  // namespace

bool can_access_peer(int64_t device, int64_t peer_device) {
  const int count = device_count();
  check_device_index(device, "device", count);
  check_device_index(peer_device, "peer_device", count);
  if (device == peer_device) return true;
  int can = 0;
  check_cuda(cudaDeviceCanAccessPeer(&can, static_cast<int>(device), static_cast<int>(peer_device)),
             "cudaDeviceCanAccessPeer");
  return can != 0;
}

void enable_peer_access(int64_t device, int64_t peer_device) {
  if (device == peer_device) return;
  if (!can_access_peer(device, peer_device)) {
    throw std::runtime_error("GPU " + std::to_string(device) + " cannot access the memory of GPU " +
                             std::to_string(peer_device) +
                             " (no peer-to-peer path between them); move the KV through host "
                             "memory or place the instances on GPUs with P2P (NVLink/PCIe)");
  }
  int previous = 0;
  check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
  check_cuda(cudaSetDevice(static_cast<int>(device)), "cudaSetDevice");
  const cudaError_t err = cudaDeviceEnablePeerAccess(static_cast<int>(peer_device), 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();  // not an error for us
  cudaSetDevice(previous);
  if (err != cudaErrorPeerAccessAlreadyEnabled) {
    check_cuda(err, "cudaDeviceEnablePeerAccess(" + std::to_string(peer_device) + ")");
  }
}

void check_kernel_accessible(std::uintptr_t address, const char* name, int device) {
  const cudaPointerAttributes attr = pointer_attributes(address, name);
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      if (attr.device != device) enable_peer_access(device, attr.device);
      return;
    case cudaMemoryTypeManaged:
    case cudaMemoryTypeHost:
      return;
    case cudaMemoryTypeUnregistered:
      break;
  }
  throw std::invalid_argument(std::string(name) + " (" + hex(address) +
                              ") is not CUDA memory (pageable host memory or an unknown "
                              "address); pass a CUDA tensor's data_ptr()");
}

void check_host_memory(std::uintptr_t address, const char* name) {
  const cudaPointerAttributes attr = pointer_attributes(address, name);
  check_arg(attr.type == cudaMemoryTypeUnregistered || attr.type == cudaMemoryTypeHost, name, " (",
            hex(address), ") must be in host memory (a CPU tensor), got memory of ",
            attr.type == cudaMemoryTypeManaged ? "managed" : "device", " type");
}

}  // namespace drt::cuda_ops

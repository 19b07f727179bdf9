// Helpers of the launcher layer (csrc/): argument checks that become Python ValueErrors.
// pybind11 maps std::invalid_argument to ValueError and std::runtime_error to RuntimeError.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "distserve_rt/common.h"

namespace drt {

// Throws ValueError("<what>") when `ok` is false. Use for every value a caller can get wrong.
// The message parts are evaluated at the call even when `ok` holds: pass cheap values only
// (numbers, string literals), never something built for the message, on hot paths.
template <typename... Args>
inline void check_arg(bool ok, const Args&... what) {
  if (ok) return;
  std::ostringstream msg;
  (msg << ... << what);
  throw std::invalid_argument(msg.str());
}

inline DType to_dtype(int64_t code) {
  check_arg(code >= 0 && code <= 2, "dtype code ", code, " is not one of 0 (float32), ",
            "1 (float16), 2 (bfloat16)");
  return static_cast<DType>(code);
}

// Raises for a non-OK status returned by a kernel; `op` names the operation.
inline void throw_if_error(Status status, const char* op) {
  if (status == Status::kOk) return;
  std::string msg = std::string(op) + " failed: " + status_name(status);
  if (status == Status::kInvalidArgument) throw std::invalid_argument(msg);
  throw std::runtime_error(msg);
}

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace drt

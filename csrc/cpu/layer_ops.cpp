// Launchers and bindings of the CPU layer ops: linear (16-bit weights), rms_norm (with an
// optional fused residual add), silu_and_mul and rotary (kernels: distserve_rt/cpu/linear.h,
// distserve_rt/cpu/layer_ops.h). Shapes, dtypes and contiguity are checked by the Python
// wrappers (distserve_rt/ops/layer_ops.py); here, what a wrong call could turn into a read or
// write outside a buffer: sizes, alignment and the positions of rotary.
// These ops run several times per layer per step, so the GIL is released only around work
// big enough to pay for it.
#include "distserve_rt/cpu/layer_ops.h"

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "common/launcher.h"
#include "cpu/threads.h"
#include "distserve_rt/cpu/linear.h"

namespace py = pybind11;

namespace {

using drt::as_ptr;
using drt::check_arg;

template <typename Fn>
drt::Status run(int64_t work, Fn&& fn) {
  drt::cpu::apply_num_threads();
  if (work < drt::cpu::kElementwiseParallelMin) return fn();
  py::gil_scoped_release release;
  return fn();
}

// x widened to fp32, kept per calling thread and grown on demand: allocating m * k floats
// per call would page-fault them in on every layer of every step.
float* linear_scratch(int64_t numel) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < numel) scratch.resize(numel);
  return scratch.data();
}

void linear(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t out,
            int64_t m, int64_t n, int64_t k, int64_t x_row_stride, int dtype_code, bool out_fp32) {
  const drt::DType dtype = drt::to_dtype(dtype_code);
  check_arg(dtype != drt::DType::kFloat32, "linear: the native kernel is for float16/bfloat16 ",
            "weights (float32 runs on torch's sgemm)");
  check_arg(m >= 0 && n >= 1 && k >= 1, "linear: m, n, k must be >= 0, >= 1, >= 1; got ", m, ", ",
            n, ", ", k);
  check_arg(x_row_stride >= k, "linear: x row stride ", x_row_stride, " < in_features ", k);
  if (m == 0) return;
  check_arg(x != 0 && weight != 0 && out != 0, "linear: x, weight and out must be non-null");
  const drt::cpu::LinearParams p{as_ptr<const void>(x),
                                 as_ptr<const void>(weight),
                                 as_ptr<const void>(bias),
                                 as_ptr<void>(out),
                                 linear_scratch(m * k),
                                 m,
                                 n,
                                 k,
                                 x_row_stride,
                                 out_fp32};
  drt::cpu::apply_num_threads();
  drt::Status status;
  {
    py::gil_scoped_release release;
    status = dtype == drt::DType::kBFloat16 ? drt::cpu::linear<drt::cpu::bf16>(p)
                                            : drt::cpu::linear<drt::cpu::fp16>(p);
  }
  drt::throw_if_error(status, "linear");
}

void rms_norm(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t out, std::uintptr_t weight,
              int64_t num_tokens, int64_t hidden, int64_t x_stride, double eps, int dtype_code) {
  const drt::DType dtype = drt::to_dtype(dtype_code);
  check_arg(num_tokens >= 0 && hidden >= 1 && x_stride >= hidden,
            "rms_norm: bad sizes num_tokens=", num_tokens, " hidden=", hidden,
            " x_stride=", x_stride);
  check_arg(eps > 0, "rms_norm: eps must be > 0, got ", eps);
  if (num_tokens == 0) return;
  check_arg(x != 0 && out != 0 && weight != 0, "rms_norm: x, out and weight must be non-null");
  const drt::cpu::RMSNormParams p{as_ptr<void>(x),   as_ptr<void>(residual),
                                  as_ptr<void>(out), as_ptr<const void>(weight),
                                  num_tokens,        hidden,
                                  x_stride,          static_cast<float>(eps)};
  const drt::Status status = run(num_tokens * hidden, [&] {
    return DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t, [&] { return drt::cpu::rms_norm<scalar_t>(p); });
  });
  drt::throw_if_error(status, "rms_norm");
}

void silu_and_mul(std::uintptr_t x, std::uintptr_t out, int64_t num_tokens, int64_t d,
                  int dtype_code) {
  const drt::DType dtype = drt::to_dtype(dtype_code);
  check_arg(num_tokens >= 0 && d >= 1, "silu_and_mul: bad sizes num_tokens=", num_tokens, " d=", d);
  if (num_tokens == 0) return;
  check_arg(x != 0 && out != 0, "silu_and_mul: x and out must be non-null");
  const drt::cpu::SiluAndMulParams p{as_ptr<const void>(x), as_ptr<void>(out), num_tokens, d};
  const drt::Status status = run(num_tokens * d, [&] {
    return DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t,
                                  [&] { return drt::cpu::silu_and_mul<scalar_t>(p); });
  });
  drt::throw_if_error(status, "silu_and_mul");
}

void rotary(std::uintptr_t query, std::uintptr_t key, std::uintptr_t positions,
            std::uintptr_t cos_sin, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
            int64_t head_dim, int64_t query_stride, int64_t key_stride, int64_t max_position,
            int dtype_code) {
  const drt::DType dtype = drt::to_dtype(dtype_code);
  check_arg(
      num_tokens >= 0 && num_heads >= 1 && num_kv_heads >= 0 && head_dim >= 2 && head_dim % 2 == 0,
      "rotary: bad sizes num_tokens=", num_tokens, " num_heads=", num_heads,
      " num_kv_heads=", num_kv_heads, " head_dim=", head_dim, " (even, >= 2)");
  check_arg(query_stride >= num_heads * head_dim && key_stride >= num_kv_heads * head_dim,
            "rotary: token strides ", query_stride, ", ", key_stride, " are smaller than a token");
  if (num_tokens == 0) return;
  check_arg(query != 0 && key != 0 && positions != 0 && cos_sin != 0,
            "rotary: query, key, positions and cos_sin must be non-null");
  const auto* pos = as_ptr<const int64_t>(positions);
  for (int64_t t = 0; t < num_tokens; ++t)
    check_arg(pos[t] >= 0 && pos[t] < max_position, "rotary: positions[", t, "] = ", pos[t],
              " is outside the cos/sin table [0, ", max_position, ")");
  const drt::cpu::RotaryParams p{
      as_ptr<void>(query), as_ptr<void>(key), pos,          as_ptr<const float>(cos_sin),
      num_tokens,          num_heads,         num_kv_heads, head_dim,
      query_stride,        key_stride,        max_position};
  const drt::Status status = run(num_tokens * (num_heads + num_kv_heads) * head_dim, [&] {
    return DRT_CPU_DISPATCH_DTYPE(dtype, scalar_t, [&] { return drt::cpu::rotary<scalar_t>(p); });
  });
  drt::throw_if_error(status, "rotary");
}

}  // namespace

void register_layer_ops(py::module_& m) {
  m.def("linear", &linear, py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("x_row_stride"),
        py::arg("dtype"), py::arg("out_fp32"),
        "out[m, n] = x[m, k] . weight[n, k]^T (+ bias[n]) for float16/bfloat16 weights, fp32 "
        "accumulation (see linear.h).");
  m.def("rms_norm", &rms_norm, py::kw_only(), py::arg("x"), py::arg("residual"), py::arg("out"),
        py::arg("weight"), py::arg("num_tokens"), py::arg("hidden"), py::arg("x_stride"),
        py::arg("eps"), py::arg("dtype"),
        "out = rms_norm(x) * weight; with a residual (non-zero pointer): residual = x + "
        "residual first, then out = rms_norm(residual) * weight.");
  m.def("silu_and_mul", &silu_and_mul, py::kw_only(), py::arg("x"), py::arg("out"),
        py::arg("num_tokens"), py::arg("d"), py::arg("dtype"),
        "out[t, :d] = silu(x[t, :d]) * x[t, d:2d].");
  m.def("rotary", &rotary, py::kw_only(), py::arg("query"), py::arg("key"), py::arg("positions"),
        py::arg("cos_sin"), py::arg("num_tokens"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("query_stride"), py::arg("key_stride"),
        py::arg("max_position"), py::arg("dtype"),
        "Neox-style RoPE in place on query and key from a [max_position, 2, head_dim / 2] fp32 "
        "cos/sin table.");
}

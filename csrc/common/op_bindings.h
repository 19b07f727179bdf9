// Keyword-only bindings of the ops whose arguments are a drt::*Args struct (op_args.h),
// shared by the CPU module (csrc/cpu/) and the CUDA module (csrc/cuda/module.cpp).
//
// Each op is bound as `name(*, field=..., ...)`: the call's keywords are matched to the
// struct's fields by name through a table of (name, member) pairs, each written by one
// DRT_ARG(Args, field) so the name and the member cannot disagree, and checked at compile
// time to cover the struct (every field is 8 bytes: sizeof(Args) == 8 * fields). There is no
// positional list anywhere to get out of order: a positional argument, an unknown keyword
// (e.g. a misspelt or swapped-in name) or a missing one is a TypeError naming it. The
// docstring's first line is the signature, `name(*, key: int, ..., dtype: int) -> None`.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "distserve_rt/op_args.h"

namespace drt::bindings {

namespace py = pybind11;

template <typename Args>
struct ArgField {
  const char* name;
  std::variant<std::uintptr_t Args::*, int64_t Args::*, double Args::*> member;
};

#define DRT_ARG(Args, field) \
  ::drt::bindings::ArgField<Args> { #field, &Args::field }

// Every field of op_args.h is 8 bytes (keep it so), so a table with fewer entries than its
// struct has fields (a field added to op_args.h but not here) fails to compile.
template <typename Args, std::size_t N>
constexpr bool covers(const std::array<ArgField<Args>, N>&) {
  return sizeof(Args) == N * 8;
}

inline const std::array<ArgField<WriteKVArgs>, 13> kWriteKVFields{{
    DRT_ARG(WriteKVArgs, key),
    DRT_ARG(WriteKVArgs, value),
    DRT_ARG(WriteKVArgs, kv_cache),
    DRT_ARG(WriteKVArgs, slot_mapping),
    DRT_ARG(WriteKVArgs, num_tokens),
    DRT_ARG(WriteKVArgs, num_kv_heads),
    DRT_ARG(WriteKVArgs, head_dim),
    DRT_ARG(WriteKVArgs, key_token_stride),
    DRT_ARG(WriteKVArgs, value_token_stride),
    DRT_ARG(WriteKVArgs, num_blocks),
    DRT_ARG(WriteKVArgs, block_size),
    DRT_ARG(WriteKVArgs, kv_block_stride),
    DRT_ARG(WriteKVArgs, dtype),
}};

inline const std::array<ArgField<CopyBlocksArgs>, 9> kCopyBlocksFields{{
    DRT_ARG(CopyBlocksArgs, src),
    DRT_ARG(CopyBlocksArgs, dst),
    DRT_ARG(CopyBlocksArgs, block_mapping),
    DRT_ARG(CopyBlocksArgs, num_pairs),
    DRT_ARG(CopyBlocksArgs, src_num_blocks),
    DRT_ARG(CopyBlocksArgs, dst_num_blocks),
    DRT_ARG(CopyBlocksArgs, src_block_stride_bytes),
    DRT_ARG(CopyBlocksArgs, dst_block_stride_bytes),
    DRT_ARG(CopyBlocksArgs, block_bytes),
}};

inline const std::array<ArgField<PrefillAttentionArgs>, 25> kPrefillAttentionFields{{
    DRT_ARG(PrefillAttentionArgs, query),
    DRT_ARG(PrefillAttentionArgs, key),
    DRT_ARG(PrefillAttentionArgs, value),
    DRT_ARG(PrefillAttentionArgs, out),
    DRT_ARG(PrefillAttentionArgs, cu_seqlens),
    DRT_ARG(PrefillAttentionArgs, batch),
    DRT_ARG(PrefillAttentionArgs, num_tokens),
    DRT_ARG(PrefillAttentionArgs, max_seqlen_q),
    DRT_ARG(PrefillAttentionArgs, num_heads),
    DRT_ARG(PrefillAttentionArgs, num_kv_heads),
    DRT_ARG(PrefillAttentionArgs, head_dim),
    DRT_ARG(PrefillAttentionArgs, query_token_stride),
    DRT_ARG(PrefillAttentionArgs, key_token_stride),
    DRT_ARG(PrefillAttentionArgs, value_token_stride),
    DRT_ARG(PrefillAttentionArgs, out_token_stride),
    DRT_ARG(PrefillAttentionArgs, softmax_scale),
    DRT_ARG(PrefillAttentionArgs, kv_cache),
    DRT_ARG(PrefillAttentionArgs, block_table),
    DRT_ARG(PrefillAttentionArgs, prefix_lens),
    DRT_ARG(PrefillAttentionArgs, slot_mapping),
    DRT_ARG(PrefillAttentionArgs, num_blocks),
    DRT_ARG(PrefillAttentionArgs, block_size),
    DRT_ARG(PrefillAttentionArgs, kv_block_stride),
    DRT_ARG(PrefillAttentionArgs, max_blocks_per_seq),
    DRT_ARG(PrefillAttentionArgs, dtype),
}};

inline const std::array<ArgField<DecodeAttentionArgs>, 20> kDecodeAttentionFields{{
    DRT_ARG(DecodeAttentionArgs, query),
    DRT_ARG(DecodeAttentionArgs, out),
    DRT_ARG(DecodeAttentionArgs, kv_cache),
    DRT_ARG(DecodeAttentionArgs, block_table),
    DRT_ARG(DecodeAttentionArgs, seq_lens),
    DRT_ARG(DecodeAttentionArgs, workspace),
    DRT_ARG(DecodeAttentionArgs, workspace_bytes),
    DRT_ARG(DecodeAttentionArgs, batch),
    DRT_ARG(DecodeAttentionArgs, max_seq_len),
    DRT_ARG(DecodeAttentionArgs, num_heads),
    DRT_ARG(DecodeAttentionArgs, num_kv_heads),
    DRT_ARG(DecodeAttentionArgs, head_dim),
    DRT_ARG(DecodeAttentionArgs, query_stride),
    DRT_ARG(DecodeAttentionArgs, out_stride),
    DRT_ARG(DecodeAttentionArgs, softmax_scale),
    DRT_ARG(DecodeAttentionArgs, num_blocks),
    DRT_ARG(DecodeAttentionArgs, block_size),
    DRT_ARG(DecodeAttentionArgs, kv_block_stride),
    DRT_ARG(DecodeAttentionArgs, max_blocks_per_seq),
    DRT_ARG(DecodeAttentionArgs, dtype),
}};

inline const std::array<ArgField<DecodeWorkspaceArgs>, 4> kDecodeWorkspaceFields{{
    DRT_ARG(DecodeWorkspaceArgs, batch),
    DRT_ARG(DecodeWorkspaceArgs, num_heads),
    DRT_ARG(DecodeWorkspaceArgs, head_dim),
    DRT_ARG(DecodeWorkspaceArgs, max_seq_len),
}};

#undef DRT_ARG

static_assert(covers(kWriteKVFields) && covers(kCopyBlocksFields) &&
                  covers(kPrefillAttentionFields) && covers(kDecodeAttentionFields) &&
                  covers(kDecodeWorkspaceFields),
              "a field table in op_bindings.h misses a field of its struct in op_args.h");

namespace detail {

template <typename T>
const char* type_name() {
  return std::is_same_v<T, double> ? "float" : "int";
}

template <typename Args, typename T>
const char* member_type_name(T Args::*) {
  return type_name<T>();
}

// The fields' names as interned Python strings (the dict lookups then compare pointers).
// Never freed: interned strings live as long as the interpreter, like the bound function.
template <typename Args, std::size_t N>
std::array<PyObject*, N> intern_names(const std::array<ArgField<Args>, N>& fields, const char* op) {
  std::array<PyObject*, N> names{};
  for (std::size_t i = 0; i < N; ++i) {
    for (std::size_t j = 0; j < i; ++j) {
      if (std::string(fields[j].name) == fields[i].name)
        throw std::logic_error(std::string(op) + ": field " + fields[i].name + " listed twice");
    }
    names[i] = PyUnicode_InternFromString(fields[i].name);
    if (names[i] == nullptr) throw py::error_already_set();
  }
  return names;
}

// What a keyword of type T accepts, for the error message.
template <typename T>
const char* allowed_values() {
  if constexpr (std::is_same_v<T, double>) return "a float";
  if constexpr (std::is_same_v<T, std::uintptr_t>) return "an int >= 0 (an address or handle)";
  return "an int";
}

template <typename T>
T cast_keyword(const char* op, const char* name, PyObject* value) {
  try {
    return py::handle(value).cast<T>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(op) + "() argument '" + name + "' must be " +
                         allowed_values<T>() + ", got " + std::string(py::repr(value)));
  }
}

inline PyObject* required_keyword(PyObject* kwargs, PyObject* name, const char* op,
                                  const char* field) {
  PyObject* value = PyDict_GetItemWithError(kwargs, name);  // borrowed
  if (value != nullptr) return value;
  if (PyErr_Occurred()) throw py::error_already_set();
  throw py::type_error(std::string(op) + "() missing keyword argument '" + field + "'");
}

// Names a keyword of `kwargs` that is neither a field nor `extra` (called once the count
// shows that one exists).
template <typename Args, std::size_t N>
[[noreturn]] void throw_unknown_keyword(const char* op, const py::kwargs& kwargs,
                                        const std::array<ArgField<Args>, N>& fields,
                                        const char* extra) {
  std::string allowed;
  for (const auto& f : fields) allowed += std::string(allowed.empty() ? "" : ", ") + f.name;
  if (extra != nullptr) allowed += std::string(", ") + extra;
  for (const auto& item : kwargs) {
    const std::string key = py::str(item.first);
    bool known = extra != nullptr && key == extra;
    for (const auto& f : fields) known = known || key == f.name;
    if (!known) {
      throw py::type_error(std::string(op) + "() got an unexpected keyword argument '" + key +
                           "'; allowed: " + allowed);
    }
  }
  throw py::type_error(std::string(op) + "() got unexpected keyword arguments");
}

template <typename Args, std::size_t N>
std::string signature(const char* op, const std::array<ArgField<Args>, N>& fields,
                      const char* extra, const char* returns) {
  std::string sig = std::string(op) + "(*";
  for (const auto& f : fields) {
    sig += std::string(", ") + f.name + ": " +
           std::visit([](auto member) { return member_type_name(member); }, f.member);
  }
  if (extra != nullptr) sig += std::string(", ") + extra + ": int";
  return sig + ") -> " + returns;
}

}  // namespace detail

// Binds `op` on `m` with keyword-only arguments: the fields of Args, then, when `extra` is
// given (CUDA's stream), one more int passed to launch as its second argument. `launch`
// releases the GIL itself where it should: the keywords are read with it held.
template <typename Args, std::size_t N, typename Launch>
void def_op(py::module_& m, const char* op, const std::array<ArgField<Args>, N>& fields,
            const char* doc, Launch launch, const char* extra = nullptr) {
  constexpr bool kTakesExtra = std::is_invocable_v<Launch, const Args&, std::uintptr_t>;
  if (kTakesExtra != (extra != nullptr))
    throw std::logic_error(std::string(op) + ": `extra` must name launch's second argument");
  const std::array<PyObject*, N> names = detail::intern_names(fields, op);
  PyObject* extra_name = extra == nullptr ? nullptr : PyUnicode_InternFromString(extra);
  const auto num_keywords = static_cast<Py_ssize_t>(N + (extra == nullptr ? 0 : 1));

  auto call = [=](const py::args& args, const py::kwargs& kwargs) {
    if (!args.empty()) {
      throw py::type_error(std::string(op) + "() takes keyword arguments only, got " +
                           std::to_string(args.size()) + " positional (signature in its __doc__)");
    }
    PyObject* dict = kwargs.ptr();
    Args a{};
    for (std::size_t i = 0; i < N; ++i) {
      PyObject* value = detail::required_keyword(dict, names[i], op, fields[i].name);
      std::visit(
          [&](auto member) {
            using T = std::remove_reference_t<decltype(a.*member)>;
            a.*member = detail::cast_keyword<T>(op, fields[i].name, value);
          },
          fields[i].member);
    }
    std::uintptr_t extra_value = 0;
    if constexpr (kTakesExtra) {
      PyObject* value = detail::required_keyword(dict, extra_name, op, extra);
      extra_value = detail::cast_keyword<std::uintptr_t>(op, extra, value);
    }
    // Every required keyword was found, so any more are unknown ones.
    if (PyDict_Size(dict) != num_keywords) detail::throw_unknown_keyword(op, kwargs, fields, extra);
    if constexpr (kTakesExtra) {
      return launch(a, extra_value);
    } else {
      (void)extra_value;
      return launch(a);
    }
  };
  using Result = std::invoke_result_t<decltype(call), const py::args&, const py::kwargs&>;
  const std::string full_doc =
      detail::signature(op, fields, extra, std::is_void_v<Result> ? "None" : "int") + "\n\n" + doc;
  // pybind11's own signature line would read `(*args, **kwargs)`; ours names the fields.
  py::options options;
  options.disable_function_signatures();
  m.def(op, call, full_doc.c_str());
}

}  // namespace drt::bindings

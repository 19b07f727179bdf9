// Binding of drt::BlockManager (include/distserve_rt/block_manager.h) as _C.BlockManager.
// Turns its status codes into ValueErrors that name the request, the argument and the value,
// and its outputs into numpy arrays (zero-copy into torch with torch.from_numpy). Running
// out of blocks on append is not an error: the scheduler acts on it, so those calls return
// None and nothing changed. distserve_rt/core/block_manager.py is the documented front.
#include "distserve_rt/block_manager.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/launcher.h"

namespace py = pybind11;

namespace {

using drt::AllocStatus;
using drt::BatchStatus;
using drt::BlockManager;
using drt::BlockStatus;
using drt::check_arg;

using Int64Array = py::array_t<std::int64_t, py::array::c_style>;

const char* alloc_status_name(AllocStatus status) {
  switch (status) {
    case AllocStatus::kOk:
      return "OK";
    case AllocStatus::kLater:
      return "LATER";
    case AllocStatus::kNever:
      return "NEVER";
  }
  return "unknown";
}

std::unique_ptr<BlockManager> make_block_manager(std::int64_t num_blocks, std::int64_t block_size,
                                                 double watermark, bool enable_prefix_caching,
                                                 int hash_bits) {
  check_arg(block_size == 8 || block_size == 16 || block_size == 32,
            "block_size must be one of 8, 16, 32, got ", block_size);
  check_arg(num_blocks >= 1, "num_blocks must be >= 1, got ", num_blocks);
  const std::int64_t max_blocks = std::numeric_limits<std::int32_t>::max() / block_size;
  check_arg(num_blocks <= max_blocks, "num_blocks must be <= ", max_blocks, " for block_size ",
            block_size, " (token positions are int32 in seq_lens), got ", num_blocks);
  check_arg(watermark >= 0.0 && watermark < 1.0, "watermark must be in [0, 1), got ", watermark);
  check_arg(hash_bits >= 1 && hash_bits <= 64, "hash_bits must be in [1, 64], got ", hash_bits);
  return std::make_unique<BlockManager>(static_cast<std::int32_t>(num_blocks),
                                        static_cast<std::int32_t>(block_size), watermark,
                                        enable_prefix_caching, hash_bits);
}

// Raises for the statuses every per-request call shares. The binding checks counts and
// ranges before calling, so any other status here is a bug of this layer.
void raise_for(BlockStatus status, const char* op, std::int64_t request_id) {
  const std::string who = std::string(op) + ": request_id " + std::to_string(request_id);
  switch (status) {
    case BlockStatus::kOk:
      return;
    case BlockStatus::kUnknownRequest:
      throw std::invalid_argument(who + " is not allocated (never allocated, or already freed)");
    case BlockStatus::kDuplicateRequest:
      throw std::invalid_argument(who + " is already allocated");
    default:
      throw std::runtime_error(who + ": unexpected block manager status " +
                               std::to_string(static_cast<int>(status)));
  }
}

// Reads a 1-D batch argument (list, tuple, numpy array or CPU tensor of ints) as int64.
// Numpy's own conversion would truncate [1.5] to [1], a silent wrong request id, so the
// element type is checked first: only integer arrays convert, and only by safe casts.
Int64Array as_int64_array(const py::handle& value, const char* name) {
  // check_arg evaluates its message eagerly: repr/str only on the failing path, since the
  // repr of a 256-id array alone costs ~300 us.
  const py::array array = py::array::ensure(value);
  if (!array) {
    check_arg(false, name, " must be a 1-D sequence of ints, got ", std::string(py::repr(value)));
  }
  check_arg(array.ndim() == 1, name, " must be 1-D, got ", array.ndim(), " dimensions");
  if (array.size() == 0) return Int64Array(0);  // [] is float64 to numpy
  const char kind = array.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    check_arg(false, name, " must hold ints, got dtype ", std::string(py::str(array.dtype())));
  }
  Int64Array ids = Int64Array::ensure(array);  // safe casts only: uint64 fails
  if (!ids) {
    check_arg(false, name, " must fit int64, got dtype ", std::string(py::str(array.dtype())));
  }
  return ids;
}

// One batch argument: request_ids [num_requests] and optional num_new_tokens [num_requests]
// (None: one new token per request). Owns the converted arrays.
struct Batch {
  Int64Array ids;
  std::optional<Int64Array> counts;
  const std::int64_t* request_ids;
  const std::int64_t* num_new_tokens;  // nullptr: one new token per request
  std::size_t num_requests;
};

Batch as_batch(const py::handle& request_ids, const py::handle& num_new_tokens) {
  Batch batch{as_int64_array(request_ids, "request_ids"), std::nullopt, nullptr, nullptr, 0};
  batch.request_ids = batch.ids.data();
  batch.num_requests = static_cast<std::size_t>(batch.ids.shape(0));
  if (num_new_tokens.is_none()) return batch;
  batch.counts = as_int64_array(num_new_tokens, "num_new_tokens");
  check_arg(batch.counts->shape(0) == batch.ids.shape(0),
            "num_new_tokens must have one count per request (", batch.num_requests, "), got ",
            batch.counts->shape(0));
  batch.num_new_tokens = batch.counts->data();
  return batch;
}

// Raises for a failed batch call, naming the request at fault by its batch position.
void raise_for_batch(const BatchStatus& status, const char* op, const Batch& batch) {
  if (status.ok()) return;
  const auto i = static_cast<std::size_t>(status.index);
  const std::string at = std::string(op) + ": request_ids[" + std::to_string(i) + "] = ";
  switch (status.status) {
    case BlockStatus::kUnknownRequest:
      throw std::invalid_argument(at + std::to_string(batch.request_ids[i]) +
                                  " is not allocated (never allocated, or already freed)");
    case BlockStatus::kDuplicateRequest:
      throw std::invalid_argument(at + std::to_string(batch.request_ids[i]) +
                                  " appears more than once in request_ids");
    case BlockStatus::kInvalidArgument:
      throw std::invalid_argument(std::string(op) + ": num_new_tokens[" + std::to_string(i) +
                                  "] must be >= 1, got " + std::to_string(batch.num_new_tokens[i]));
    default:
      throw std::runtime_error(std::string(op) + ": unexpected block manager status " +
                               std::to_string(static_cast<int>(status.status)));
  }
}

// A request's token ids (list, numpy array or CPU tensor of ints in [0, INT32_MAX]), at
// least min_len of them: what the prefix cache hashes and compares.
std::vector<std::int32_t> as_token_ids(const py::handle& value, std::int64_t min_len,
                                       const char* op) {
  const Int64Array ids = as_int64_array(value, "token_ids");
  const std::int64_t n = ids.shape(0);
  check_arg(n >= min_len, op, ": token_ids must hold at least ", min_len, " tokens, got ", n);
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  const std::int64_t* data = ids.data();
  for (std::int64_t i = 0; i < n; ++i) {
    if (data[i] < 0 || data[i] > std::numeric_limits<std::int32_t>::max()) {
      check_arg(false, op, ": token_ids[", i, "] must be in [0, 2**31 - 1], got ", data[i]);
    }
    out[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(data[i]);
  }
  return out;
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
  py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
  if (!values.empty()) std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(T));
  return out;
}

// (slot_mapping [num_new_tokens] int64, block_copies [num_pairs, 2] int64)
py::tuple append_result(const std::vector<std::int64_t>& slot_mapping,
                        const std::vector<std::int64_t>& block_copies) {
  py::array_t<std::int64_t> pairs(
      {static_cast<py::ssize_t>(block_copies.size() / 2), py::ssize_t{2}});
  if (!block_copies.empty()) {
    std::memcpy(pairs.mutable_data(), block_copies.data(),
                block_copies.size() * sizeof(std::int64_t));
  }
  return py::make_tuple(to_numpy(slot_mapping), pairs);
}

// Returns the tokens found in the prefix cache (0 without token_ids or with caching off).
std::int64_t allocate(BlockManager& self, std::int64_t request_id, std::int64_t num_tokens,
                      const py::handle& token_ids, std::uint64_t extra_key) {
  check_arg(num_tokens >= 0, "allocate: num_tokens must be >= 0, got ", num_tokens);
  std::vector<std::int32_t> tokens;
  if (!token_ids.is_none()) tokens = as_token_ids(token_ids, num_tokens, "allocate");
  std::int64_t num_cached_tokens = 0;
  const BlockStatus status =
      self.allocate(request_id, num_tokens, token_ids.is_none() ? nullptr : tokens.data(),
                    extra_key, &num_cached_tokens);
  if (status == BlockStatus::kOutOfBlocks) {
    throw std::invalid_argument(
        "allocate: request_id " + std::to_string(request_id) + " needs " +
        std::to_string(self.blocks_for_tokens(num_tokens)) + " blocks for num_tokens " +
        std::to_string(num_tokens) + " but can_allocate is " +
        alloc_status_name(self.can_allocate(num_tokens)) + " (" +
        std::to_string(self.num_free_blocks()) + " free, watermark " +
        std::to_string(self.watermark_blocks()) + " of " + std::to_string(self.num_blocks()) +
        " blocks); check can_allocate first");
  }
  raise_for(status, "allocate", request_id);
  return num_cached_tokens;
}

// token_ids [num_computed_tokens - start]: the tokens at positions start.. (see the header).
void cache_blocks(BlockManager& self, std::int64_t request_id, const py::handle& token_ids,
                  std::int64_t num_computed_tokens, std::int64_t start) {
  const std::int64_t num_tokens = self.num_tokens(request_id);
  if (num_tokens < 0) raise_for(BlockStatus::kUnknownRequest, "cache_blocks", request_id);
  check_arg(0 <= num_computed_tokens && num_computed_tokens <= num_tokens,
            "cache_blocks: num_computed_tokens must be in [0, num_tokens = ", num_tokens,
            "] of request_id ", request_id, ", got ", num_computed_tokens);
  check_arg(start >= 0 && start % self.block_size() == 0 && start <= num_computed_tokens,
            "cache_blocks: start must be a multiple of block_size (", self.block_size(),
            ") in [0, num_computed_tokens = ", num_computed_tokens, "], got ", start);
  const std::vector<std::int32_t> tokens =
      as_token_ids(token_ids, num_computed_tokens - start, "cache_blocks");
  raise_for(self.cache_blocks(request_id, tokens.data(), num_computed_tokens, start),
            "cache_blocks", request_id);
}

std::int64_t blocks_to_append_one(BlockManager& self, std::int64_t request_id,
                                  std::int64_t num_new_tokens, const char* op) {
  check_arg(num_new_tokens >= 1, op, ": num_new_tokens must be >= 1, got ", num_new_tokens);
  std::int64_t num_needed = 0;
  raise_for(self.num_blocks_to_append(&request_id, &num_new_tokens, 1, &num_needed).status, op,
            request_id);
  return num_needed;
}

py::object append_slots(BlockManager& self, std::int64_t request_id, std::int64_t num_new_tokens) {
  check_arg(num_new_tokens >= 1, "append_slots: num_new_tokens must be >= 1, got ", num_new_tokens);
  std::vector<std::int64_t> slot_mapping, block_copies;
  const BatchStatus status =
      self.append_slots(&request_id, &num_new_tokens, 1, &slot_mapping, &block_copies);
  if (status.status == BlockStatus::kOutOfBlocks) return py::none();
  raise_for(status.status, "append_slots", request_id);
  return append_result(slot_mapping, block_copies);
}

py::object append_slots_batch(BlockManager& self, const py::handle& request_ids,
                              const py::handle& num_new_tokens) {
  const Batch batch = as_batch(request_ids, num_new_tokens);
  std::vector<std::int64_t> slot_mapping, block_copies;
  slot_mapping.reserve(batch.num_requests);
  const BatchStatus status = self.append_slots(batch.request_ids, batch.num_new_tokens,
                                               batch.num_requests, &slot_mapping, &block_copies);
  if (status.status == BlockStatus::kOutOfBlocks) return py::none();
  raise_for_batch(status, "append_slots_batch", batch);
  return append_result(slot_mapping, block_copies);
}

std::int64_t num_blocks_to_append(BlockManager& self, const py::handle& request_ids,
                                  const py::handle& num_new_tokens) {
  const Batch batch = as_batch(request_ids, num_new_tokens);
  std::int64_t num_needed = 0;
  raise_for_batch(self.num_blocks_to_append(batch.request_ids, batch.num_new_tokens,
                                            batch.num_requests, &num_needed),
                  "num_blocks_to_append", batch);
  return num_needed;
}

py::array_t<std::int64_t> slot_mapping(const BlockManager& self, std::int64_t request_id,
                                       std::int64_t start, std::optional<std::int64_t> end) {
  const std::int64_t num_tokens = self.num_tokens(request_id);
  if (num_tokens < 0) raise_for(BlockStatus::kUnknownRequest, "slot_mapping", request_id);
  const std::int64_t stop = end.value_or(num_tokens);
  check_arg(0 <= start && start <= stop && stop <= num_tokens, "slot_mapping: positions [", start,
            ", ", stop, ") must lie in [0, num_tokens = ", num_tokens, "] of request_id ",
            request_id, " with start <= end");
  std::vector<std::int64_t> out;
  raise_for(self.slot_mapping(request_id, start, stop, &out), "slot_mapping", request_id);
  return to_numpy(out);
}

py::array_t<std::int32_t> block_table(const BlockManager& self, std::int64_t request_id) {
  const std::vector<std::int32_t>* table = self.block_table(request_id);
  if (table == nullptr) raise_for(BlockStatus::kUnknownRequest, "block_table", request_id);
  return to_numpy(*table);
}

// [num_requests, max_blocks_per_seq] int32, padded with block 0.
py::array_t<std::int32_t> block_tables(const BlockManager& self, const py::handle& request_ids,
                                       std::optional<std::int64_t> max_blocks_per_seq) {
  const Batch batch = as_batch(request_ids, py::none());
  std::int64_t width = 0;
  raise_for_batch(self.max_blocks_per_seq(batch.request_ids, batch.num_requests, &width),
                  "block_tables", batch);
  if (max_blocks_per_seq) {
    check_arg(*max_blocks_per_seq >= width, "block_tables: max_blocks_per_seq must be >= ", width,
              " (the widest block_table of the batch), got ", *max_blocks_per_seq);
    width = *max_blocks_per_seq;
  }
  py::array_t<std::int32_t> out(
      {static_cast<py::ssize_t>(batch.num_requests), static_cast<py::ssize_t>(width)});
  raise_for_batch(
      self.block_tables(batch.request_ids, batch.num_requests, width, out.mutable_data()),
      "block_tables", batch);
  return out;
}

py::array_t<std::int32_t> seq_lens(const BlockManager& self, const py::handle& request_ids) {
  const Batch batch = as_batch(request_ids, py::none());
  py::array_t<std::int32_t> out(static_cast<py::ssize_t>(batch.num_requests));
  raise_for_batch(self.seq_lens(batch.request_ids, batch.num_requests, out.mutable_data()),
                  "seq_lens", batch);
  return out;
}

AllocStatus can_allocate(const BlockManager& self, std::int64_t num_tokens,
                         const py::handle& token_ids, std::uint64_t extra_key) {
  check_arg(num_tokens >= 0, "can_allocate: num_tokens must be >= 0, got ", num_tokens);
  if (token_ids.is_none()) return self.can_allocate(num_tokens);
  const std::vector<std::int32_t> tokens = as_token_ids(token_ids, num_tokens, "can_allocate");
  return self.can_allocate(num_tokens, tokens.data(), extra_key);
}

void fork_request(BlockManager& self, std::int64_t parent_id, std::int64_t child_id) {
  const BlockStatus status = self.fork(parent_id, child_id);
  raise_for(status, "fork", status == BlockStatus::kDuplicateRequest ? child_id : parent_id);
}

void free_request(BlockManager& self, std::int64_t request_id) {
  raise_for(self.free(request_id), "free", request_id);
}

bool can_append_slots(BlockManager& self, std::int64_t request_id, std::int64_t num_new_tokens) {
  return blocks_to_append_one(self, request_id, num_new_tokens, "can_append_slots") <=
         self.num_free_blocks();
}

std::int64_t num_tokens_of(const BlockManager& self, std::int64_t request_id) {
  const std::int64_t num_tokens = self.num_tokens(request_id);
  if (num_tokens < 0) raise_for(BlockStatus::kUnknownRequest, "num_tokens", request_id);
  return num_tokens;
}

}  // namespace

// [num_tokens / block_size] uint64: the chained hashes of the full blocks of token_ids, as
// the prefix cache keys them (content only: the same on every instance).
py::array_t<std::uint64_t> prefix_block_hashes(const py::handle& token_ids, std::int64_t block_size,
                                               std::uint64_t extra_key) {
  check_arg(block_size >= 1, "prefix_block_hashes: block_size must be >= 1, got ", block_size);
  const std::vector<std::int32_t> tokens = as_token_ids(token_ids, 0, "prefix_block_hashes");
  const auto size = static_cast<std::int32_t>(block_size);
  std::vector<std::uint64_t> out;
  std::uint64_t hash = drt::root_block_hash(extra_key);
  for (std::size_t start = 0; start + size <= tokens.size(); start += size) {
    hash = drt::block_hash(hash, tokens.data() + start, size);
    out.push_back(hash);
  }
  return to_numpy(out);
}

void register_block_manager(py::module_& m) {
  // Keyword-only, as every op of the module (tests/kernels/test_native_abi.py).
  m.def("prefix_block_hashes", &prefix_block_hashes, py::kw_only(), py::arg("token_ids"),
        py::arg("block_size"), py::arg("extra_key"));
  py::enum_<AllocStatus>(m, "AllocStatus")
      .value("OK", AllocStatus::kOk)
      .value("LATER", AllocStatus::kLater)
      .value("NEVER", AllocStatus::kNever);

  const auto request_id = py::arg("request_id");
  const auto request_ids = py::arg("request_ids");
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init(&make_block_manager), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("watermark"), py::arg("enable_prefix_caching"), py::arg("hash_bits"))
      .def_property_readonly("enable_prefix_caching", &BlockManager::enable_prefix_caching)
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def_property_readonly("prefix_cache_queries", &BlockManager::prefix_cache_queries)
      .def_property_readonly("prefix_cache_hits", &BlockManager::prefix_cache_hits)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("watermark_blocks", &BlockManager::watermark_blocks)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_requests", &BlockManager::num_requests)
      .def("has_request", &BlockManager::has_request, request_id)
      .def("can_allocate", &can_allocate, py::arg("num_tokens"), py::arg("token_ids"),
           py::arg("extra_key"))
      .def("allocate", &allocate, request_id, py::arg("num_tokens"), py::arg("token_ids"),
           py::arg("extra_key"))
      .def("cache_blocks", &cache_blocks, request_id, py::arg("token_ids"),
           py::arg("num_computed_tokens"), py::arg("start"))
      .def("fork", &fork_request, py::arg("parent_id"), py::arg("child_id"))
      .def("free", &free_request, request_id)
      .def("can_append_slots", &can_append_slots, request_id, py::arg("num_new_tokens"))
      .def("append_slots", &append_slots, request_id, py::arg("num_new_tokens"))
      .def("append_slots_batch", &append_slots_batch, request_ids, py::arg("num_new_tokens"))
      .def("num_blocks_to_append", &num_blocks_to_append, request_ids, py::arg("num_new_tokens"))
      .def("slot_mapping", &slot_mapping, request_id, py::arg("start"), py::arg("end"))
      .def("block_table", &block_table, request_id)
      .def("block_tables", &block_tables, request_ids, py::arg("max_blocks_per_seq"))
      .def("seq_lens", &seq_lens, request_ids)
      .def("num_tokens", &num_tokens_of, request_id)
      .def("refcounts", [](const BlockManager& self) { return to_numpy(self.refcounts()); })
      .def("free_blocks", [](const BlockManager& self) { return to_numpy(self.free_blocks()); })
      .def("evictable_blocks",
           [](const BlockManager& self) { return to_numpy(self.evictable_blocks()); })
      .def("check_invariants", &BlockManager::check_invariants);
}

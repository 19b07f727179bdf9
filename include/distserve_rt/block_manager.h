// Paged-KV block manager: which blocks of the KV pool hold each request's tokens.
// Header-only C++17, no torch, no pybind11; expected conditions (out of blocks, an unknown
// request id) are status codes, never exceptions, so the binding layer in csrc/ decides
// what a caller sees (vLLM's BlockSpaceManager shape, llama.cpp's error rule).
//
// Vocabulary (include/distserve_rt/common.h):
//   block_table   [ceil(num_tokens / block_size)] int32 block ids of one request, in order
//   slot          block * block_size + offset: where token position p lives,
//                 block = block_table[p / block_size], offset = p % block_size
//   slot_mapping  [num_tokens] int64 slots, what write_kv takes
//   block_copies  [num_pairs, 2] int64 (src block, dst block) rows, what copy_blocks takes
//
// Blocks are reference counted so that requests can share a prefix (fork); a block returns
// to the free list only when its last owner frees it. Writing into a shared last block
// copies it first (copy-on-write): the append takes a fresh block and reports the pair the
// caller must copy before writing the new tokens' KV.
//
// With prefix caching on (include/distserve_rt/prefix_cache.h), full blocks whose KV the
// engine has written are registered by their chained hash (cache_blocks); a new request's
// leading full blocks that are cached are shared instead of allocated (allocate reports how
// many tokens that saves). A cached block nobody owns is still free: it waits in an LRU list
// and is evicted only when no never-cached free block is left.
//
// Cost: every call is O(blocks and requests it touches). The free list is a stack (LIFO
// reuse keeps recently used blocks warm in cache); requests live in an unordered_map.
// Not thread-safe: one scheduler owns one manager.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "distserve_rt/prefix_cache.h"

namespace drt {

// Answer to "can a new request of n tokens be admitted?" (vLLM's AllocStatus).
enum class AllocStatus : int {
  kOk = 0,     // enough free blocks above the watermark now
  kLater = 1,  // not now; possible once running requests free blocks
  kNever = 2,  // needs more blocks than the pool can ever grant a new request
};

enum class BlockStatus : int {
  kOk = 0,
  kOutOfBlocks = 1,  // expected: not enough free blocks now; nothing changed
  kUnknownRequest = 2,
  kDuplicateRequest = 3,  // id already in use, or twice in one batch
  kInvalidArgument = 4,   // a count or position range outside what the request allows
};

// Status of a call over a batch of requests; `index` is the batch position of the request
// at fault, -1 when no single request is (out of blocks).
struct BatchStatus {
  BlockStatus status = BlockStatus::kOk;
  std::int64_t index = -1;
  bool ok() const { return status == BlockStatus::kOk; }
};

class BlockManager {
 public:
  // Preconditions (the binding layer checks them and names the bad value):
  //   num_blocks >= 1, block_size >= 1, num_blocks * block_size <= INT32_MAX (every token
  //   position fits the int32 seq_lens of the attention ABI), 0 <= watermark < 1.
  // hash_bits: see PrefixCache (64 except in tests).
  BlockManager(std::int32_t num_blocks, std::int32_t block_size, double watermark,
               bool enable_prefix_caching = false, int hash_bits = 64)
      : num_blocks_(num_blocks),
        block_size_(block_size),
        watermark_blocks_(static_cast<std::int32_t>(watermark * num_blocks)),
        refcounts_(static_cast<std::size_t>(num_blocks), 0) {
    if (enable_prefix_caching) {
      cache_ = std::make_unique<PrefixCache>(num_blocks, block_size, hash_bits);
    }
    free_blocks_.reserve(static_cast<std::size_t>(num_blocks));
    // Block 0 on top: a fresh pool hands out blocks 0, 1, 2, ... in order.
    for (std::int32_t block = num_blocks - 1; block >= 0; --block) free_blocks_.push_back(block);
  }

  std::int32_t num_blocks() const { return num_blocks_; }
  std::int32_t block_size() const { return block_size_; }
  std::int32_t watermark_blocks() const { return watermark_blocks_; }
  bool enable_prefix_caching() const { return cache_ != nullptr; }
  // Free blocks: never-cached ones plus cached ones nobody owns (evictable).
  std::int64_t num_free_blocks() const {
    return static_cast<std::int64_t>(free_blocks_.size()) + (cache_ ? cache_->num_lru() : 0);
  }
  // Blocks registered in the prefix cache (owned or not).
  std::int64_t num_cached_blocks() const { return cache_ ? cache_->num_cached() : 0; }
  // Prompt tokens looked up by allocate, and how many of them were cached (vLLM's
  // prefix_cache_queries / prefix_cache_hits), since construction.
  std::int64_t prefix_cache_queries() const { return prefix_cache_queries_; }
  std::int64_t prefix_cache_hits() const { return prefix_cache_hits_; }
  std::int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  std::int64_t num_requests() const { return static_cast<std::int64_t>(requests_.size()); }
  bool has_request(std::int64_t request_id) const { return requests_.count(request_id) != 0; }

  // Blocks that hold num_tokens (>= 0) tokens.
  std::int64_t blocks_for_tokens(std::int64_t num_tokens) const {
    return num_tokens / block_size_ + (num_tokens % block_size_ != 0 ? 1 : 0);
  }

  // num_tokens >= 0. NEVER is relative to the pool minus the watermark, since allocate()
  // never dips into the watermark: a request that cannot fit there would wait forever.
  // With `tokens` (the request's token ids, at least num_tokens of them; prefix caching
  // on), the cached leading blocks count as already there: only the rest must be free.
  AllocStatus can_allocate(std::int64_t num_tokens, const std::int32_t* tokens = nullptr,
                           std::uint64_t extra_key = 0) const {
    const std::int64_t num_total = blocks_for_tokens(num_tokens);
    if (num_total > num_blocks_ - watermark_blocks_) return AllocStatus::kNever;
    std::int64_t num_taken = num_total;  // free blocks the allocation takes
    if (tokens != nullptr && cache_) {
      match_prefix(tokens, num_tokens, extra_key, &hits_scratch_);
      num_taken -= static_cast<std::int64_t>(hits_scratch_.size());
      for (const std::int32_t block : hits_scratch_) num_taken += refcounts_[block] == 0;
    }
    if (num_free_blocks() - num_taken < watermark_blocks_) return AllocStatus::kLater;
    return AllocStatus::kOk;
  }

  // Builds the block_table of a new request holding num_tokens tokens (positions
  // 0..num_tokens-1). With `tokens` (see can_allocate), its leading cached full blocks are
  // shared (refcount + 1) and *num_cached_tokens says how many tokens they hold (a multiple
  // of block_size, at most num_tokens - 1: the last token is always computed, for its
  // logits, and in a block of the request's own, so no shared block is ever written).
  // kOutOfBlocks when can_allocate with the same arguments is not kOk.
  BlockStatus allocate(std::int64_t request_id, std::int64_t num_tokens,
                       const std::int32_t* tokens = nullptr, std::uint64_t extra_key = 0,
                       std::int64_t* num_cached_tokens = nullptr) {
    if (num_tokens < 0) return BlockStatus::kInvalidArgument;
    if (has_request(request_id)) return BlockStatus::kDuplicateRequest;
    if (can_allocate(num_tokens, tokens, extra_key) != AllocStatus::kOk) {
      return BlockStatus::kOutOfBlocks;
    }
    const bool lookup = tokens != nullptr && cache_;
    if (!lookup) hits_scratch_.clear();  // else: can_allocate just matched the prefix
    Request& request = requests_[request_id];
    request.num_tokens = num_tokens;
    request.extra_key = extra_key;
    request.cached_tail = PrefixCache::root(extra_key);
    const std::int64_t num_needed = blocks_for_tokens(num_tokens);
    request.block_table.reserve(static_cast<std::size_t>(num_needed));
    // Hits first: taking them out of the LRU keeps the fresh pops below from evicting them.
    for (const std::int32_t block : hits_scratch_) {
      if (refcounts_[block]++ == 0) cache_->remove_lru(block);
      request.block_table.push_back(block);
    }
    if (!hits_scratch_.empty()) request.cached_tail = cache_->link_of(hits_scratch_.back());
    request.num_cached_blocks = static_cast<std::int64_t>(hits_scratch_.size());
    while (static_cast<std::int64_t>(request.block_table.size()) < num_needed) {
      request.block_table.push_back(pop_free_block());
    }
    const std::int64_t num_hit_tokens = request.num_cached_blocks * block_size_;
    if (lookup) {
      prefix_cache_queries_ += num_tokens;
      prefix_cache_hits_ += num_hit_tokens;
    }
    if (num_cached_tokens != nullptr) *num_cached_tokens = num_hit_tokens;
    return BlockStatus::kOk;
  }

  // Registers the request's full blocks among its first num_computed_tokens positions (their
  // KV written) in the prefix cache, from the first one not yet registered. tokens[j] is the
  // token at position tokens_start + j, up to num_computed_tokens - 1: a caller passes only
  // the unregistered tail (a decode: the block it just filled), not the whole context.
  // tokens_start (a multiple of block_size, >= 0) past the first unregistered block
  // registers nothing: a chain cannot skip a block. A block whose content another block
  // already caches stays unregistered (the request keeps using it). No-op with caching off.
  BlockStatus cache_blocks(std::int64_t request_id, const std::int32_t* tokens,
                           std::int64_t num_computed_tokens, std::int64_t tokens_start = 0);

  // The child gets the parent's tokens by sharing every block (refcount + 1); no block is
  // taken until one of them writes into a shared block.
  BlockStatus fork(std::int64_t parent_id, std::int64_t child_id) {
    const auto parent = requests_.find(parent_id);
    if (parent == requests_.end()) return BlockStatus::kUnknownRequest;
    if (has_request(child_id)) return BlockStatus::kDuplicateRequest;
    // unordered_map insertion may rehash but keeps references to elements valid.
    Request& child = requests_[child_id];
    child.block_table = parent->second.block_table;
    child.num_tokens = parent->second.num_tokens;
    child.extra_key = parent->second.extra_key;
    child.num_cached_blocks = parent->second.num_cached_blocks;
    child.cached_tail = parent->second.cached_tail;
    for (const std::int32_t block : child.block_table) ++refcounts_[block];
    return BlockStatus::kOk;
  }

  BlockStatus free(std::int64_t request_id) {
    const auto it = requests_.find(request_id);
    if (it == requests_.end()) return BlockStatus::kUnknownRequest;
    // Tail first, so the request's first block ends on top of the stack and a later
    // allocation reuses the blocks in their old order.
    const std::vector<std::int32_t>& block_table = it->second.block_table;
    // Cached blocks join the LRU tail first too: a prompt's last blocks are evicted before
    // its first ones, which every longer prompt sharing the prefix needs.
    for (auto block = block_table.rbegin(); block != block_table.rend(); ++block) {
      if (--refcounts_[*block] != 0) continue;
      if (cache_ && cache_->is_cached(*block)) {
        cache_->push_lru(*block);
      } else {
        free_blocks_.push_back(*block);
      }
    }
    requests_.erase(it);
    return BlockStatus::kOk;
  }

  // Blocks that appending num_new_tokens[i] tokens (1 each when num_new_tokens is null) to
  // request_ids[i], for i < num_requests, would take, copy-on-write included; exact also
  // when several requests of the batch share a block. Changes nothing.
  BatchStatus num_blocks_to_append(const std::int64_t* request_ids,
                                   const std::int64_t* num_new_tokens, std::size_t num_requests,
                                   std::int64_t* num_needed) {
    const BatchStatus status = plan_append(request_ids, num_new_tokens, num_requests, num_needed);
    undo_plan();
    return status;
  }

  // Appends the batch's new tokens (see num_blocks_to_append) and adds their slots to
  // *slot_mapping in batch order, and one (src, dst) pair to *block_copies for each
  // copy-on-write. All or nothing: kOutOfBlocks (or any error) changes nothing.
  BatchStatus append_slots(const std::int64_t* request_ids, const std::int64_t* num_new_tokens,
                           std::size_t num_requests, std::vector<std::int64_t>* slot_mapping,
                           std::vector<std::int64_t>* block_copies) {
    std::int64_t num_needed = 0;
    const BatchStatus status = plan_append(request_ids, num_new_tokens, num_requests, &num_needed);
    if (!status.ok()) return status;
    if (num_needed > num_free_blocks()) {
      undo_plan();
      return {BlockStatus::kOutOfBlocks, -1};
    }
    commit_append(slot_mapping, block_copies);
    return {};
  }

  // Slots of the request's positions start..end-1 (0 <= start <= end <= num_tokens).
  BlockStatus slot_mapping(std::int64_t request_id, std::int64_t start, std::int64_t end,
                           std::vector<std::int64_t>* out) const {
    const Request* request = find(request_id);
    if (request == nullptr) return BlockStatus::kUnknownRequest;
    if (start < 0 || start > end || end > request->num_tokens) return BlockStatus::kInvalidArgument;
    out->reserve(out->size() + static_cast<std::size_t>(end - start));
    for (std::int64_t pos = start; pos < end; ++pos) out->push_back(slot_of(*request, pos));
    return BlockStatus::kOk;
  }

  // nullptr for an unknown request.
  const std::vector<std::int32_t>* block_table(std::int64_t request_id) const {
    const Request* request = find(request_id);
    return request == nullptr ? nullptr : &request->block_table;
  }

  // -1 for an unknown request.
  std::int64_t num_tokens(std::int64_t request_id) const {
    const Request* request = find(request_id);
    return request == nullptr ? -1 : request->num_tokens;
  }

  // Widest block_table of the batch.
  BatchStatus max_blocks_per_seq(const std::int64_t* request_ids, std::size_t num_requests,
                                 std::int64_t* width) const {
    *width = 0;
    for (std::size_t i = 0; i < num_requests; ++i) {
      const Request* request = find(request_ids[i]);
      if (request == nullptr) return {BlockStatus::kUnknownRequest, static_cast<std::int64_t>(i)};
      *width = std::max(*width, static_cast<std::int64_t>(request->block_table.size()));
    }
    return {};
  }

  // out [num_requests, width] int32: row i is request_ids[i]'s block_table padded with block
  // 0, a valid id, so that a kernel reading past seq_lens still reads inside the pool.
  // kInvalidArgument when a block_table is wider than width.
  BatchStatus block_tables(const std::int64_t* request_ids, std::size_t num_requests,
                           std::int64_t width, std::int32_t* out) const {
    for (std::size_t i = 0; i < num_requests; ++i) {
      const Request* request = find(request_ids[i]);
      const auto index = static_cast<std::int64_t>(i);
      if (request == nullptr) return {BlockStatus::kUnknownRequest, index};
      const std::vector<std::int32_t>& table = request->block_table;
      if (static_cast<std::int64_t>(table.size()) > width) {
        return {BlockStatus::kInvalidArgument, index};
      }
      std::int32_t* row = out + index * width;
      std::copy(table.begin(), table.end(), row);
      std::fill(row + table.size(), row + width, 0);
    }
    return {};
  }

  // out [num_requests] int32: tokens each request holds.
  BatchStatus seq_lens(const std::int64_t* request_ids, std::size_t num_requests,
                       std::int32_t* out) const {
    for (std::size_t i = 0; i < num_requests; ++i) {
      const Request* request = find(request_ids[i]);
      if (request == nullptr) return {BlockStatus::kUnknownRequest, static_cast<std::int64_t>(i)};
      out[i] = static_cast<std::int32_t>(request->num_tokens);
    }
    return {};
  }

  // [num_blocks] owners of each block (0 = free).
  const std::vector<std::int32_t>& refcounts() const { return refcounts_; }
  // The free stack of never-cached blocks, bottom to top (the next block handed out is the
  // last one; only when it is empty are cached blocks evicted).
  const std::vector<std::int32_t>& free_blocks() const { return free_blocks_; }
  // Cached blocks nobody owns, in eviction order (first evicted first).
  std::vector<std::int32_t> evictable_blocks() const {
    return cache_ ? cache_->lru_blocks() : std::vector<std::int32_t>{};
  }

  // Recomputes the bookkeeping from the block tables; "" when consistent, else the first
  // broken invariant. O(num_blocks + total block_table length): for tests and debugging.
  std::string check_invariants() const;

 private:
  struct Request {
    std::vector<std::int32_t> block_table;  // [ceil(num_tokens / block_size)]
    std::int64_t num_tokens = 0;
    std::uint64_t extra_key = 0;
    std::int64_t num_cached_blocks = 0;  // leading blocks registered (or found) in the cache
    PrefixCache::Link cached_tail;       // the cache's block for the last of those
    std::uint64_t batch_stamp = 0;       // last batch call that touched it: finds duplicates
  };

  // One request's part of a planned append_slots.
  struct PlannedAppend {
    Request* request;
    std::int64_t num_new_tokens;
    std::int32_t cow_src;  // shared last block to copy, -1 when none
  };

  const Request* find(std::int64_t request_id) const {
    const auto it = requests_.find(request_id);
    return it == requests_.end() ? nullptr : &it->second;
  }

  std::int64_t slot_of(const Request& request, std::int64_t pos) const {
    const std::int32_t block = request.block_table[static_cast<std::size_t>(pos / block_size_)];
    return static_cast<std::int64_t>(block) * block_size_ + pos % block_size_;
  }

  // Never-cached blocks first; then the least recently freed cached block is evicted.
  std::int32_t pop_free_block() {
    std::int32_t block;
    if (!free_blocks_.empty()) {
      block = free_blocks_.back();
      free_blocks_.pop_back();
    } else {
      block = cache_->pop_lru();
    }
    refcounts_[block] = 1;
    return block;
  }

  // Fills *hits with the cached blocks holding tokens' leading full blocks, in order.
  void match_prefix(const std::int32_t* tokens, std::int64_t num_tokens, std::uint64_t extra_key,
                    std::vector<std::int32_t>* hits) const;

  BatchStatus plan_append(const std::int64_t* request_ids, const std::int64_t* num_new_tokens,
                          std::size_t num_requests, std::int64_t* num_needed);
  void undo_plan();
  void commit_append(std::vector<std::int64_t>* slot_mapping,
                     std::vector<std::int64_t>* block_copies);

  std::int32_t num_blocks_;
  std::int32_t block_size_;
  std::int32_t watermark_blocks_;
  std::vector<std::int32_t> refcounts_;    // [num_blocks]
  std::vector<std::int32_t> free_blocks_;  // stack of block ids with refcount 0
  std::unordered_map<std::int64_t, Request> requests_;
  std::vector<PlannedAppend> plan_;  // scratch of append_slots, empty between calls
  std::uint64_t batch_stamp_ = 0;
  std::unique_ptr<PrefixCache> cache_;  // null with prefix caching off
  // can_allocate's match, reused by the allocate that follows it (no second lookup).
  mutable std::vector<std::int32_t> hits_scratch_;
  std::int64_t prefix_cache_queries_ = 0;
  std::int64_t prefix_cache_hits_ = 0;
};

inline void BlockManager::match_prefix(const std::int32_t* tokens, std::int64_t num_tokens,
                                       std::uint64_t extra_key,
                                       std::vector<std::int32_t>* hits) const {
  hits->clear();
  // Blocks strictly before the last token's: that token is computed in a block of its own.
  const std::int64_t max_blocks = num_tokens > 0 ? (num_tokens - 1) / block_size_ : 0;
  PrefixCache::Link link = PrefixCache::root(extra_key);
  for (std::int64_t i = 0; i < max_blocks; ++i) {
    const std::int32_t* block_tokens = tokens + i * block_size_;
    const std::uint64_t hash = block_hash(link.hash, block_tokens, block_size_);
    const std::int32_t block = cache_->find(hash, link, block_tokens, extra_key);
    if (block < 0) break;
    hits->push_back(block);
    link = cache_->link_of(block);
  }
}

inline BlockStatus BlockManager::cache_blocks(std::int64_t request_id, const std::int32_t* tokens,
                                              std::int64_t num_computed_tokens,
                                              std::int64_t tokens_start) {
  const auto it = requests_.find(request_id);
  if (it == requests_.end()) return BlockStatus::kUnknownRequest;
  Request& request = it->second;
  if (num_computed_tokens < 0 || num_computed_tokens > request.num_tokens || tokens_start < 0 ||
      tokens_start % block_size_ != 0) {
    return BlockStatus::kInvalidArgument;
  }
  if (!cache_ || tokens_start > request.num_cached_blocks * block_size_) return BlockStatus::kOk;
  const std::int64_t num_full = num_computed_tokens / block_size_;
  for (std::int64_t i = request.num_cached_blocks; i < num_full; ++i) {
    const std::int32_t* block_tokens = tokens + (i * block_size_ - tokens_start);
    const std::uint64_t hash = block_hash(request.cached_tail.hash, block_tokens, block_size_);
    std::int32_t block = cache_->find(hash, request.cached_tail, block_tokens, request.extra_key);
    if (block < 0) {
      block = request.block_table[static_cast<std::size_t>(i)];
      // Already cached only after its chain's parent was evicted (a fork sharing it
      // registered it first): it keeps its one entry.
      if (!cache_->is_cached(block)) {
        cache_->insert(block, hash, request.cached_tail, block_tokens, request.extra_key);
      }
    }
    request.cached_tail = cache_->link_of(block);
    request.num_cached_blocks = i + 1;
  }
  return BlockStatus::kOk;
}

// Validates the batch and counts the blocks it takes. Copy-on-write sources are released
// here already (refcount - 1), so that a later request of the same batch sharing the block
// sees the count it will see when the append runs; undo_plan() gives them back.
inline BatchStatus BlockManager::plan_append(const std::int64_t* request_ids,
                                             const std::int64_t* num_new_tokens,
                                             std::size_t num_requests, std::int64_t* num_needed) {
  const auto fail = [this](BlockStatus status, std::size_t index) {
    undo_plan();
    return BatchStatus{status, static_cast<std::int64_t>(index)};
  };
  plan_.clear();
  ++batch_stamp_;
  *num_needed = 0;
  constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
  const std::int64_t max_count = kInt64Max - static_cast<std::int64_t>(num_blocks_) * block_size_;
  for (std::size_t i = 0; i < num_requests; ++i) {
    const auto it = requests_.find(request_ids[i]);
    if (it == requests_.end()) return fail(BlockStatus::kUnknownRequest, i);
    Request& request = it->second;
    if (request.batch_stamp == batch_stamp_) return fail(BlockStatus::kDuplicateRequest, i);
    request.batch_stamp = batch_stamp_;
    const std::int64_t count = num_new_tokens == nullptr ? 1 : num_new_tokens[i];
    if (count < 1) return fail(BlockStatus::kInvalidArgument, i);
    // Bounding the count keeps num_tokens + count from overflowing; it changes the answer
    // only for counts within the pool capacity of INT64_MAX, which saturate.
    const std::int64_t bounded = std::min(count, max_count);
    const std::int64_t num_new_blocks = blocks_for_tokens(request.num_tokens + bounded) -
                                        static_cast<std::int64_t>(request.block_table.size());
    *num_needed = std::min(*num_needed, kInt64Max - num_new_blocks) + num_new_blocks;
    PlannedAppend planned{&request, count, -1};
    const bool writes_last_block = request.num_tokens % block_size_ != 0;
    if (writes_last_block && refcounts_[request.block_table.back()] > 1) {
      planned.cow_src = request.block_table.back();
      --refcounts_[planned.cow_src];
      *num_needed = std::min(*num_needed, kInt64Max - 1) + 1;
    }
    plan_.push_back(planned);
  }
  return {};
}

inline void BlockManager::undo_plan() {
  for (const PlannedAppend& planned : plan_) {
    if (planned.cow_src >= 0) ++refcounts_[planned.cow_src];
  }
  plan_.clear();
}

// Runs a plan that fits in the free blocks; the copy-on-write sources are already released.
inline void BlockManager::commit_append(std::vector<std::int64_t>* slot_mapping,
                                        std::vector<std::int64_t>* block_copies) {
  for (const PlannedAppend& planned : plan_) {
    Request& request = *planned.request;
    if (planned.cow_src >= 0) {
      const std::int32_t dst = pop_free_block();
      request.block_table.back() = dst;
      block_copies->push_back(planned.cow_src);
      block_copies->push_back(dst);
    }
    const std::int64_t end = request.num_tokens + planned.num_new_tokens;
    for (std::int64_t pos = request.num_tokens; pos < end; ++pos) {
      if (pos / block_size_ == static_cast<std::int64_t>(request.block_table.size())) {
        request.block_table.push_back(pop_free_block());
      }
      slot_mapping->push_back(slot_of(request, pos));
    }
    request.num_tokens = end;
  }
  plan_.clear();
}

inline std::string BlockManager::check_invariants() const {
  // owners[b]: block_tables containing b; last_table[b]: which one, to catch a block listed
  // twice in one block_table.
  std::vector<std::int64_t> owners(refcounts_.size(), 0);
  std::vector<std::int64_t> last_table(refcounts_.size(), -1);
  std::int64_t table_index = 0;
  for (const auto& [request_id, request] : requests_) {
    const std::string who = "request " + std::to_string(request_id);
    const auto num_entries = static_cast<std::int64_t>(request.block_table.size());
    if (num_entries != blocks_for_tokens(request.num_tokens)) {
      return who + " holds " + std::to_string(request.num_tokens) + " tokens in " +
             std::to_string(num_entries) + " blocks";
    }
    for (const std::int32_t block : request.block_table) {
      if (block < 0 || block >= num_blocks_) return who + " has block id " + std::to_string(block);
      if (last_table[block] == table_index)
        return who + " lists block " + std::to_string(block) + " twice";
      last_table[block] = table_index;
      ++owners[block];
    }
    ++table_index;
  }
  std::vector<bool> in_free_list(refcounts_.size(), false);
  for (const std::int32_t block : free_blocks_) {
    if (block < 0 || block >= num_blocks_) return "free list has block id " + std::to_string(block);
    if (in_free_list[block]) return "free list has block " + std::to_string(block) + " twice";
    in_free_list[block] = true;
  }
  for (std::int32_t block = 0; block < num_blocks_; ++block) {
    const std::string what = "block " + std::to_string(block);
    if (refcounts_[block] < 0) return what + " has refcount " + std::to_string(refcounts_[block]);
    if (refcounts_[block] != owners[block]) {
      return what + " has refcount " + std::to_string(refcounts_[block]) + " but " +
             std::to_string(owners[block]) + " owners";
    }
    const bool in_lru = cache_ && cache_->in_lru(block);
    if (in_free_list[block] && in_lru) return what + " is both in the free stack and the LRU";
    if ((in_free_list[block] || in_lru) != (refcounts_[block] == 0)) {
      return what + (refcounts_[block] != 0 ? " is free but owned" : " is unowned but not free");
    }
  }
  if (!plan_.empty()) return "an append plan was left behind";
  if (cache_) return cache_->check(refcounts_);
  return "";
}

}  // namespace drt

// Automatic prefix caching: which full KV blocks hold which token prefix (vLLM's automatic
// prefix caching, written for drt::BlockManager, which owns the refcounts and calls this).
// Header-only C++17, no torch, no pybind11.
//
// A full block is identified by a chained hash: hash(block i) = H(hash(block i-1), its
// block_size token ids), and hash(-1) = H(extra_key) so that whatever else changes the KV
// (model, LoRA adapter, multimodal input) keys the whole chain. The hash is content-only
// (no block ids): two instances with the same prompt compute the same chain, which is what
// cache-aware routing compares.
//
// A 64-bit hash may collide, and a collision must never hand out wrong KV. So the hash only
// indexes: a candidate block matches when its tokens and extra key are equal AND its parent
// is the very block matched one position earlier (block id and generation; the generation
// changes when a block is evicted and reused, so a stale child never matches a new parent).
// By induction from the root the matched chain holds exactly the prompt's tokens: a collision
// costs a miss, never wrong output.
//
// Cached blocks that no request owns stay valid in an LRU list and are evicted (their hash
// entry dropped) only when the block manager needs a block and has no unused one left.
//
// Cost: find/insert/evict O(block_size) plus the hash bucket; LRU operations O(1) (an
// intrusive doubly linked list over block ids). Memory: block_size int32 per block.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace drt {

// splitmix64's finalizer: a bijective mix, so distinct inputs of one step stay distinct.
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The chain's start: the hash "before block 0" of a request with this extra key.
inline std::uint64_t root_block_hash(std::uint64_t extra_key) {
  return mix64(mix64(extra_key) ^ 0x64697374736572ULL);  // "distser": not hash(0) == 0
}

// hash(block) from its parent's hash and its block_size token ids.
inline std::uint64_t block_hash(std::uint64_t parent_hash, const std::int32_t* tokens,
                                std::int32_t block_size) {
  std::uint64_t h = mix64(parent_hash);
  for (std::int32_t i = 0; i < block_size; ++i) {
    h = mix64(h ^ static_cast<std::uint32_t>(tokens[i]));
  }
  return h;
}

class PrefixCache {
 public:
  // Where a chain stands: the block matched (or registered) last, its generation and hash.
  // block -1 is the root (nothing matched yet).
  struct Link {
    std::int32_t block = -1;
    std::uint32_t generation = 0;
    std::uint64_t hash = 0;
  };

  // hash_bits (1..64): how many low bits of the hash index the table. Always 64 but in
  // tests, which narrow it so that every lookup collides and the exact match is exercised.
  PrefixCache(std::int32_t num_blocks, std::int32_t block_size, int hash_bits = 64)
      : block_size_(block_size),
        key_mask_(hash_bits >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << hash_bits) - 1),
        tokens_(static_cast<std::size_t>(num_blocks) * block_size, 0),
        extra_key_(static_cast<std::size_t>(num_blocks), 0),
        hash_(static_cast<std::size_t>(num_blocks), 0),
        parent_(static_cast<std::size_t>(num_blocks), Link{}),
        generation_(static_cast<std::size_t>(num_blocks), 0),
        cached_(static_cast<std::size_t>(num_blocks), 0),
        lru_prev_(static_cast<std::size_t>(num_blocks), -1),
        lru_next_(static_cast<std::size_t>(num_blocks), -1),
        in_lru_(static_cast<std::size_t>(num_blocks), 0) {}

  static Link root(std::uint64_t extra_key) { return Link{-1, 0, root_block_hash(extra_key)}; }

  bool is_cached(std::int32_t block) const { return cached_[block] != 0; }
  std::int64_t num_cached() const { return static_cast<std::int64_t>(by_hash_.size()); }
  Link link_of(std::int32_t block) const { return Link{block, generation_[block], hash_[block]}; }

  // The cached block holding `tokens` [block_size] right after `parent`, or -1.
  std::int32_t find(std::uint64_t hash, const Link& parent, const std::int32_t* tokens,
                    std::uint64_t extra_key) const {
    const auto range = by_hash_.equal_range(hash & key_mask_);
    for (auto it = range.first; it != range.second; ++it) {
      const std::int32_t block = it->second;
      const Link& p = parent_[block];
      if (p.block != parent.block || p.generation != parent.generation) continue;
      if (extra_key_[block] != extra_key) continue;
      const std::int32_t* held = tokens_.data() + static_cast<std::size_t>(block) * block_size_;
      if (std::equal(held, held + block_size_, tokens)) return block;
    }
    return -1;
  }

  // Registers `block` (not cached, its KV written) as holding `tokens` after `parent`.
  void insert(std::int32_t block, std::uint64_t hash, const Link& parent,
              const std::int32_t* tokens, std::uint64_t extra_key) {
    std::copy(tokens, tokens + block_size_,
              tokens_.begin() + static_cast<std::ptrdiff_t>(block) * block_size_);
    extra_key_[block] = extra_key;
    hash_[block] = hash;
    parent_[block] = parent;
    cached_[block] = 1;
    by_hash_.emplace(hash & key_mask_, block);
  }

  // Drops `block`'s entry; its content is about to be overwritten. Children registered
  // after it keep their entries but can never match again (the generation moved on); they
  // age out of the LRU like any other block.
  void evict(std::int32_t block) {
    const auto range = by_hash_.equal_range(hash_[block] & key_mask_);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == block) {
        by_hash_.erase(it);
        break;
      }
    }
    cached_[block] = 0;
    ++generation_[block];
  }

  // ---- LRU of cached blocks with refcount 0 (head: evicted first) -----------------------

  std::int64_t num_lru() const { return num_lru_; }
  bool in_lru(std::int32_t block) const { return in_lru_[block] != 0; }

  void push_lru(std::int32_t block) {
    lru_prev_[block] = lru_tail_;
    lru_next_[block] = -1;
    if (lru_tail_ >= 0) lru_next_[lru_tail_] = block;
    if (lru_head_ < 0) lru_head_ = block;
    lru_tail_ = block;
    in_lru_[block] = 1;
    ++num_lru_;
  }

  void remove_lru(std::int32_t block) {
    const std::int32_t prev = lru_prev_[block], next = lru_next_[block];
    (prev >= 0 ? lru_next_[prev] : lru_head_) = next;
    (next >= 0 ? lru_prev_[next] : lru_tail_) = prev;
    in_lru_[block] = 0;
    --num_lru_;
  }

  // Precondition: num_lru() > 0. Evicts the least recently freed block and returns it.
  std::int32_t pop_lru() {
    const std::int32_t block = lru_head_;
    remove_lru(block);
    evict(block);
    return block;
  }

  // Head to tail.
  std::vector<std::int32_t> lru_blocks() const {
    std::vector<std::int32_t> out;
    for (std::int32_t b = lru_head_; b >= 0; b = lru_next_[b]) out.push_back(b);
    return out;
  }

  // "" when consistent with the refcounts, else the first broken invariant: the LRU holds
  // exactly the cached blocks nobody owns, each once, and the hash table exactly the cached
  // blocks, each under its own hash.
  std::string check(const std::vector<std::int32_t>& refcounts) const {
    std::int64_t num_in_table = 0;
    for (const auto& [hash, block] : by_hash_) {
      if (!is_cached(block)) return "hash table lists uncached block " + std::to_string(block);
      if ((hash_[block] & key_mask_) != hash)
        return "block " + std::to_string(block) + " under a wrong hash";
      ++num_in_table;
    }
    std::int64_t num_cached_blocks = 0, num_walked = 0;
    for (std::size_t b = 0; b < cached_.size(); ++b) num_cached_blocks += cached_[b];
    if (num_in_table != num_cached_blocks) return "hash table and cached flags disagree";
    std::vector<char> seen(cached_.size(), 0);
    for (std::int32_t b = lru_head_; b >= 0; b = lru_next_[b]) {
      if (seen[b] || ++num_walked > num_lru_) return "LRU list has a cycle";
      seen[b] = 1;
    }
    if (num_walked != num_lru_) return "LRU list length differs from its count";
    for (std::size_t b = 0; b < cached_.size(); ++b) {
      const bool should = cached_[b] && refcounts[b] == 0;
      if ((seen[b] != 0) != should || (in_lru_[b] != 0) != should) {
        return "block " + std::to_string(b) +
               (should ? " is cached and unowned but not in" : " is in the LRU but should not be");
      }
    }
    return "";
  }

 private:
  std::int32_t block_size_;
  std::uint64_t key_mask_;
  std::vector<std::int32_t> tokens_;       // [num_blocks, block_size] a cached block's tokens
  std::vector<std::uint64_t> extra_key_;   // [num_blocks]
  std::vector<std::uint64_t> hash_;        // [num_blocks]
  std::vector<Link> parent_;               // [num_blocks] the block it was cached after
  std::vector<std::uint32_t> generation_;  // [num_blocks] evictions so far
  std::vector<char> cached_;               // [num_blocks] has a hash entry
  std::unordered_multimap<std::uint64_t, std::int32_t> by_hash_;  // collisions share a key
  std::vector<std::int32_t> lru_prev_, lru_next_;                 // [num_blocks], -1 = none
  std::vector<char> in_lru_;                                      // [num_blocks]
  std::int32_t lru_head_ = -1, lru_tail_ = -1;
  std::int64_t num_lru_ = 0;
};

}  // namespace drt

// Checks of a slot_mapping shared by every launcher that writes new K/V into the pool
// (write_kv, prefill_attention's fused write): the same rules everywhere.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "common/launcher.h"

namespace drt {

// Names the two tokens that share `slot` (only called once a duplicate is known to exist).
inline void throw_duplicate_slot(const int64_t* slot_mapping, int64_t num_tokens, int64_t slot) {
  int64_t first = -1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] != slot) continue;
    check_arg(first < 0, "slot_mapping[", first, "] and slot_mapping[", t, "] are both ", slot,
              ": two tokens would write one slot of the KV cache (a scheduler bug); each ",
              "non-negative slot may appear at most once per call");
    first = t;
  }
}

// Slots in [0, num_slots) or negative (padding), and no slot written twice: two tokens in one
// slot would silently leave the cache holding whichever copy ran last.
inline void check_slot_mapping(const int64_t* slot_mapping,  // [num_tokens]
                               int64_t num_tokens, int64_t num_slots) {
  std::vector<int64_t> slots;  // [<= num_tokens] the non-negative slots
  slots.reserve(static_cast<std::size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    check_arg(slot < num_slots, "slot_mapping[", t, "] = ", slot, " is out of range: slots must ",
              "be < num_blocks * block_size = ", num_slots, " (negative = padding)");
    slots.push_back(slot);
  }
  // One sequence's tokens take increasing slots, so an O(n) pass often settles it; otherwise
  // sort a copy (4096 slots: tens of microseconds, next to milliseconds of copying).
  if (std::adjacent_find(slots.begin(), slots.end(), std::greater_equal<int64_t>()) ==
      slots.end()) {
    return;
  }
  std::sort(slots.begin(), slots.end());
  const auto duplicate = std::adjacent_find(slots.begin(), slots.end());
  if (duplicate != slots.end()) throw_duplicate_slot(slot_mapping, num_tokens, *duplicate);
}

}  // namespace drt

"""The controller's view of what each decode instance holds in its prefix cache, and the
cache-aware choice of a decode instance built on it (`core.cache_routing` holds the rules).

The view is approximate, by design: the controller records the blocks a request will leave
cached on its decode instance (its prompt's full blocks when the migration is sent, all its
full blocks with KV when it finishes) and forgets the least recently recorded ones beyond the
instance's pool size; it does not hear about evictions. A stale entry costs only a longer
pull: the decode instance looks the blocks up itself at admission and pulls what it lacks,
so the view never decides which KV is used, only where a request goes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from distserve_rt.core.block_manager import prefix_block_hashes
from distserve_rt.core.cache_routing import pick_decode_instance


class DecodePrefixIndex:
    """Per decode instance (by index): the chained block hashes it likely holds cached, LRU.

    Args:
        num_blocks: each decode instance's pool size in blocks (the entries kept per
            instance: more than the pool can hold would be evicted there anyway).
        block_size: tokens per block (the hashes cover full blocks only).
    """

    def __init__(self, num_blocks: dict[int, int], block_size: int) -> None:
        self.block_size = block_size
        self._capacity = dict(num_blocks)
        self._hashes: dict[int, OrderedDict[int, None]] = {i: OrderedDict() for i in num_blocks}

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The chained hashes of the full blocks of `token_ids` (what the instances key)."""
        if len(token_ids) < self.block_size:
            return []
        return prefix_block_hashes(list(token_ids), self.block_size).tolist()

    def num_cached_blocks(self, index: int, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` recorded for instance `index` (a chain: the first
        miss ends the prefix)."""
        known = self._hashes[index]
        n = 0
        for h in hashes:
            if h not in known:
                break
            n += 1
        return n

    def record(self, index: int, hashes: Sequence[int]) -> None:
        """Instance `index` holds these blocks now (most recently used)."""
        known, capacity = self._hashes[index], self._capacity[index]
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > capacity:
            known.popitem(last=False)

    def pick(
        self,
        indices: Sequence[int],
        hashes: Sequence[int],
        num_assigned: Sequence[int],
        num_free_blocks: Sequence[int],
        max_load_imbalance: int,
    ) -> tuple[int, int]:
        """(position in `indices` of the chosen instance, its cached blocks of `hashes`)."""
        cached = [self.num_cached_blocks(i, hashes) for i in indices]
        pos = pick_decode_instance(cached, num_assigned, num_free_blocks, max_load_imbalance)
        return pos, cached[pos]

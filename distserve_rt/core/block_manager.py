"""The paged-KV block manager: which blocks of the KV pool hold each request's tokens.

A scheduler asks it, every step, whether a request can be admitted (`can_allocate`), builds
a request's block_table when it is (`allocate`), grows the tables of running requests by
the tokens of the step (`append_slots_batch`), and gives the blocks back when a request
finishes or is preempted (`free`). Its outputs are what the kernels take: `slot_mapping`
(int64, slot = block * block_size + offset) for ``write_kv``, padded `block_tables` and
`seq_lens` (int32) for the attention ops, `block_copies` (int64 pairs) for ``copy_blocks``.

Blocks are reference counted so that requests can share a prefix (`fork`, e.g. parallel
sampling): a block returns to the free list only when its last owner frees it, and writing
into a shared last block copies it first (copy-on-write, reported in
`AppendResult.block_copies`; the caller copies those blocks before writing the new KV).
The colocated engine forks for parallel sampling (n > 1): the schedulers put a step's
copies in `SchedulerOutput.block_copies` and the model runner copies them first.

Automatic prefix caching (``enable_prefix_caching``, vLLM's): once the engine has written a
full block's KV, the scheduler registers it (`cache_blocks`) under a chained hash of its
token ids; a later request whose prompt starts with the same blocks shares them instead of
recomputing them (`allocate` with ``token_ids`` returns how many tokens were cached). Cached
blocks nobody owns still count as free: they are evicted, least recently freed first, only
when no never-cached block is left. Lookups are exact (tokens compared, not only hashes),
so a hash collision costs a miss, never wrong KV (include/distserve_rt/prefix_cache.h).

The data structure is native (include/distserve_rt/block_manager.h): every call costs
O(the blocks and requests it touches); the free list is a stack, so a freed block is the
next one reused while it is still warm in cache. Not thread-safe: one scheduler owns it.

Errors the caller made (an unknown or duplicate request id, a negative count, allocating
when `can_allocate` is not OK) raise ValueError naming the request and the value. Running
out of blocks while appending is not an error: `append_slots*` return None, nothing has
changed, and the scheduler preempts or waits.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt import _C

# KV block sizes (tokens) the kernels are built for.
ALLOWED_BLOCK_SIZES = (8, 16, 32)

# Request ids of a batch call: a list/tuple of ints, or a 1-D integer numpy array or CPU
# tensor (floats and bools are rejected, never truncated).
RequestIds = Sequence[int] | np.ndarray


class AllocStatus(enum.Enum):
    """Whether a new request of some number of tokens can be admitted."""

    OK = 0
    """Enough free blocks remain above the watermark: `allocate` will succeed."""
    LATER = 1
    """Not now; possible once running requests free blocks."""
    NEVER = 2
    """Needs more blocks than the pool can ever grant a new request (num_blocks minus the
    watermark): the request must be rejected, waiting will not help."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What `append_slots` / `append_slots_batch` did."""

    slot_mapping: np.ndarray
    """int64 [total new tokens]: the slot of each new token, requests in batch order."""
    block_copies: np.ndarray
    """int64 [num_pairs, 2]: (src block, dst block) copy-on-write pairs. The caller must copy
    these blocks (``ops.copy_blocks(pool, pool, block_copies)``) before writing the new
    tokens' KV; empty when no request wrote into a shared block."""


@dataclass(frozen=True, slots=True)
class BlockManagerStats:
    """One snapshot of the pool, for logs and metrics."""

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    usage: float
    """num_used_blocks / num_blocks, in [0, 1]."""
    num_requests: int
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache at admission, since the start."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (not recomputed)."""


# The cache key's extra part for requests that share a model and nothing else (no LoRA
# adapter, no multimodal input yet): whatever else changes a block's KV goes here.
DEFAULT_EXTRA_KEY = 0


def prefix_block_hashes(
    token_ids: RequestIds, block_size: int, extra_key: int = DEFAULT_EXTRA_KEY
) -> np.ndarray:
    """uint64 [len(token_ids) // block_size]: the chained hash of each full block of
    `token_ids` as the prefix cache keys it: block i's hash covers tokens 0 .. (i + 1) *
    block_size - 1 and `extra_key`. Content only (no block ids), so equal on every instance:
    what a router compares to find where a prompt's prefix is cached."""
    return _C.prefix_block_hashes(token_ids=token_ids, block_size=block_size, extra_key=extra_key)


class BlockManager:
    """Paged-KV block allocator with reference counts (vLLM's BlockSpaceManager shape).

    Args:
        num_blocks: blocks in the KV pool (>= 1).
        block_size: tokens per block: 8, 16 or 32.
        watermark: fraction of the blocks kept free when admitting new requests, in [0, 1),
            so that running requests can still grow without an immediate preemption.
            The watermark is ``int(watermark * num_blocks)`` blocks; appends may use it.
        enable_prefix_caching: keep written full blocks reusable by later requests with
            the same prefix (see the module docstring). Off by default here, so that a
            caller with synthetic token ids (the planner's simulators) never gets hits it
            does not model; the engine passes ``EngineConfig.enable_prefix_caching``.
        hash_bits: low bits of the block hash that index the cache's table, in [1, 64].
            64 but in tests, which narrow it so that unrelated blocks collide: the lookup
            compares tokens, so collisions cost time, never correctness.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        watermark: float = 0.01,
        enable_prefix_caching: bool = False,
        hash_bits: int = 64,
    ) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {ALLOWED_BLOCK_SIZES}, got {block_size}")
        if not isinstance(watermark, (int, float)) or isinstance(watermark, bool):
            raise ValueError(f"watermark must be a float in [0, 1), got {watermark!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        # The native constructor checks the ranges (num_blocks, watermark) and says why.
        self._native = _C.BlockManager(
            num_blocks, block_size, float(watermark), enable_prefix_caching, hash_bits
        )
        self._watermark = float(watermark)

    # ---- admission --------------------------------------------------------------------

    def can_allocate(
        self,
        num_tokens: int,
        token_ids: RequestIds | None = None,
        extra_key: int = DEFAULT_EXTRA_KEY,
    ) -> AllocStatus:
        """Whether a new request holding `num_tokens` (>= 0) tokens can be allocated now.

        With `token_ids` (the request's tokens, at least `num_tokens`) and prefix caching
        on, its cached leading blocks need no free block (see `allocate`)."""
        return AllocStatus(int(self._native.can_allocate(num_tokens, token_ids, extra_key)))

    def allocate(
        self,
        request_id: int,
        num_tokens: int,
        token_ids: RequestIds | None = None,
        extra_key: int = DEFAULT_EXTRA_KEY,
    ) -> int:
        """Builds the block_table of new request `request_id` for token positions
        0..num_tokens-1 (``ceil(num_tokens / block_size)`` blocks).

        With `token_ids` (ints in [0, 2**31), at least `num_tokens`) and prefix caching
        on, the leading full blocks already cached for the same tokens and `extra_key` are
        shared instead of taken. Returns the tokens they hold, whose KV the caller need not
        compute: a multiple of block_size, at most ``num_tokens - 1`` (the last token is
        always computed, for its logits, in a block of the request's own). 0 otherwise.

        Raises ValueError when the id is already allocated or `can_allocate` with the same
        arguments is not OK: check it first.
        """
        return self._native.allocate(request_id, num_tokens, token_ids, extra_key)

    def cache_blocks(
        self, request_id: int, token_ids: RequestIds, num_computed_tokens: int, start: int = 0
    ) -> None:
        """The KV of the request's first `num_computed_tokens` tokens is written: its
        full blocks among them become reusable by later requests (a no-op with prefix
        caching off). Call it after the step that wrote them has run, never at schedule
        time: a block must not be shared before its KV exists.

        `token_ids` holds the request's tokens at positions ``start .. num_computed_tokens
        - 1`` (`start` a multiple of block_size), so that a step passes only the blocks it
        filled, not the whole context. Blocks before `start` must be registered already;
        when they are not, nothing is (a chain cannot skip a block)."""
        self._native.cache_blocks(request_id, token_ids, num_computed_tokens, start)

    def fork(self, parent_id: int, child_id: int) -> None:
        """New request `child_id` shares all of `parent_id`'s tokens and blocks (each
        block's refcount + 1); no block is taken until one of them writes into a shared
        block. Raises ValueError for an unknown parent or an existing child id."""
        self._native.fork(parent_id, child_id)

    def free(self, request_id: int) -> None:
        """Drops the request; each of its blocks returns to the free list when no other
        request shares it. Raises ValueError for an unknown (or already freed) id."""
        self._native.free(request_id)

    # ---- growth -----------------------------------------------------------------------

    def can_append_slots(self, request_id: int, num_new_tokens: int = 1) -> bool:
        """Whether `append_slots(request_id, num_new_tokens)` would succeed now (it may use
        the watermark blocks, which exist for exactly this)."""
        return self._native.can_append_slots(request_id, num_new_tokens)

    def append_slots(self, request_id: int, num_new_tokens: int = 1) -> AppendResult | None:
        """Adds `num_new_tokens` (>= 1) token positions to the request, growing its
        block_table as needed.

        Returns the new tokens' slots and any copy-on-write pair, or None when the free
        blocks do not suffice (nothing changed: preempt a request or wait).
        """
        result = self._native.append_slots(request_id, num_new_tokens)
        return None if result is None else AppendResult(*result)

    def append_slots_batch(
        self, request_ids: RequestIds, num_new_tokens: RequestIds | None = None
    ) -> AppendResult | None:
        """`append_slots` for a whole step: request_ids[i] gains num_new_tokens[i] tokens
        (one each when None, a decode step). ``slot_mapping`` lists the requests' new slots
        in batch order. All or nothing: None when the batch does not fit the free blocks,
        and then nothing changed. A request may appear once per batch."""
        result = self._native.append_slots_batch(request_ids, num_new_tokens)
        return None if result is None else AppendResult(*result)

    def num_blocks_to_append(
        self, request_ids: RequestIds, num_new_tokens: RequestIds | None = None
    ) -> int:
        """Free blocks `append_slots_batch` with the same arguments would take, copy-on-write
        included. A scheduler preempts until this is <= num_free_blocks."""
        return self._native.num_blocks_to_append(request_ids, num_new_tokens)

    # ---- kernel inputs ----------------------------------------------------------------

    def block_table(self, request_id: int) -> np.ndarray:
        """int32 [ceil(num_tokens / block_size)]: the request's block ids (a copy)."""
        return self._native.block_table(request_id)

    def block_tables(
        self, request_ids: RequestIds, max_blocks_per_seq: int | None = None
    ) -> np.ndarray:
        """int32 [len(request_ids), max_blocks_per_seq]: block_table rows padded with block
        0 (a valid id, never read below seq_lens). `max_blocks_per_seq` defaults to the
        widest row; a smaller value raises ValueError."""
        return self._native.block_tables(request_ids, max_blocks_per_seq)

    def seq_lens(self, request_ids: RequestIds) -> np.ndarray:
        """int32 [len(request_ids)]: tokens each request holds."""
        return self._native.seq_lens(request_ids)

    def num_tokens(self, request_id: int) -> int:
        """Tokens the request holds (its positions are 0..num_tokens-1)."""
        return self._native.num_tokens(request_id)

    def slot_mapping(self, request_id: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """int64 [end - start]: slots of the request's positions start..end-1 (end defaults
        to num_tokens), e.g. a prefill chunk's ``write_kv`` slot_mapping."""
        return self._native.slot_mapping(request_id, start, end)

    # ---- state ------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._native.num_blocks

    @property
    def block_size(self) -> int:
        return self._native.block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._native.enable_prefix_caching

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, owned or evictable."""
        return self._native.num_cached_blocks

    @property
    def watermark(self) -> float:
        return self._watermark

    @property
    def watermark_blocks(self) -> int:
        """Blocks `can_allocate` keeps free: ``int(watermark * num_blocks)``."""
        return self._native.watermark_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._native.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self._native.num_used_blocks

    @property
    def usage(self) -> float:
        """Fraction of the blocks in use, in [0, 1]."""
        return self._native.num_used_blocks / self._native.num_blocks

    @property
    def num_requests(self) -> int:
        return self._native.num_requests

    def __contains__(self, request_id: object) -> bool:
        """Whether `request_id` (any int-like, numpy ints included) is allocated."""
        try:
            return self._native.has_request(operator.index(request_id))
        except (TypeError, OverflowError):
            return False

    def stats(self) -> BlockManagerStats:
        native = self._native
        num_used = native.num_used_blocks
        return BlockManagerStats(
            num_blocks=native.num_blocks,
            num_free_blocks=native.num_free_blocks,
            num_used_blocks=num_used,
            usage=num_used / native.num_blocks,
            num_requests=native.num_requests,
            prefix_cache_queries=native.prefix_cache_queries,
            prefix_cache_hits=native.prefix_cache_hits,
        )

    # ---- debugging --------------------------------------------------------------------

    def refcounts(self) -> np.ndarray:
        """int32 [num_blocks]: requests sharing each block (0 = free). A copy."""
        return self._native.refcounts()

    def free_blocks(self) -> np.ndarray:
        """int32: the free stack of never-cached blocks, bottom to top (the last is handed
        out next; cached blocks are evicted only once it is empty). A copy."""
        return self._native.free_blocks()

    def evictable_blocks(self) -> np.ndarray:
        """int32: cached blocks nobody owns, in eviction order (least recently freed
        first; free too, counted in num_free_blocks). A copy."""
        return self._native.evictable_blocks()

    def check_invariants(self) -> None:
        """Recomputes the bookkeeping from the block tables (O(num_blocks + total table
        length), for tests and debugging); raises RuntimeError naming the first broken
        invariant: refcount == number of block_tables holding the block (never negative),
        no block listed twice in one table or in the free list, free (in the free stack or
        the LRU, not both) exactly when the refcount is 0, every table sized
        ceil(num_tokens / block_size), and the prefix cache's hash table and LRU agree with
        the refcounts."""
        problem = self._native.check_invariants()
        if problem:
            raise RuntimeError(f"block manager is inconsistent: {problem}")

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"watermark={self.watermark}, num_free_blocks={self.num_free_blocks}, "
            f"enable_prefix_caching={self.enable_prefix_caching}, "
            f"num_requests={self.num_requests})"
        )

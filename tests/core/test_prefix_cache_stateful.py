"""Random allocate (with prefix cache lookups) / append / register / fork / free sequences
with prefix caching on, a tiny token alphabet (so prefixes repeat and blocks collide on
purpose: narrow hash_bits) and a small pool (so cached blocks are evicted and reused).

The simulated pool holds, at each token's slot, a value that depends on the token AND every
token before it (as real KV does), written through the returned slots the way the engine
would. Checked after every step: a cache hit reads back exactly the values the request
would have computed (so a block is never shared after a different prefix, and an evicted,
rewritten block is never matched), every live request reads back its own values, refcount
== owners (never negative), each free block is in exactly one of the free stack and the LRU,
free + used == num_blocks, and the native check_invariants(). At the end everything is
freed and the pool must be whole again.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from distserve_rt.core.block_manager import AllocStatus, BlockManager

_MOD = (1 << 61) - 1


def prefix_values(tokens: list[int]) -> list[int]:
    """value[p] depends on tokens[0..p]: what a block's KV depends on."""
    out, v = [], 0
    for t in tokens:
        v = (v * 1_000_003 + t + 1) % _MOD
        out.append(v)
    return out


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.sampled_from([8, 16]),
        hash_bits=st.sampled_from([64, 2]),
        seed=st.integers(0, 3),
    )
    def setup(self, num_blocks: int, block_size: int, hash_bits: int, seed: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, 0.0, True, hash_bits)
        self.bs = block_size
        self.pool = np.full(num_blocks * block_size, -1, dtype=np.int64)  # [num_slots]
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 3, size=4 * block_size).tolist()
        # Documents sharing later blocks after different first blocks, and the reverse.
        other_first = [(t + 1) % 3 for t in base[:block_size]] + base[block_size:]
        other_third = base[: 2 * block_size] + [(t + 1) % 3 for t in base[2 * block_size :]]
        self.docs = [base, other_first, other_third]
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    def live_ids(self) -> list[int]:
        return sorted(self.tokens)

    def write(self, result, rid: int, num_new: int) -> None:
        """copy_blocks, then write_kv of the request's last num_new values."""
        bs = self.bs
        for src, dst in result.block_copies.tolist():
            self.pool[dst * bs : (dst + 1) * bs] = self.pool[src * bs : (src + 1) * bs]
        self.pool[result.slot_mapping] = prefix_values(self.tokens[rid])[-num_new:]

    @rule(data=st.data())
    def allocate(self, data) -> None:
        doc = data.draw(st.sampled_from(self.docs), "doc")
        num_tokens = data.draw(st.integers(0, len(doc)), "num_tokens")
        tokens = doc[:num_tokens]
        rid, self.next_id = self.next_id, self.next_id + 1
        status = self.bm.can_allocate(num_tokens, tokens)
        if self.bm.can_allocate(num_tokens) is AllocStatus.OK:
            assert status is AllocStatus.OK  # hits never make admission harder
        event(f"can_allocate {status.name}")
        if status is not AllocStatus.OK:
            return
        cached = self.bm.allocate(rid, num_tokens, tokens)
        event(f"hit {cached // self.bs} blocks")
        assert cached % self.bs == 0 and cached <= max(num_tokens - 1, 0)
        values = prefix_values(tokens)
        hit_slots = self.bm.slot_mapping(rid, 0, cached)
        assert self.pool[hit_slots].tolist() == values[:cached], "a hit returned other KV"
        self.pool[self.bm.slot_mapping(rid, cached)] = values[cached:]
        self.tokens[rid] = tokens
        computed = data.draw(st.integers(cached, num_tokens), "num_computed_tokens")
        self.bm.cache_blocks(rid, tokens, computed)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data) -> None:
        rid = data.draw(st.sampled_from(self.live_ids()), "request_id")
        new = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=2 * self.bs), "tokens")
        result = self.bm.append_slots(rid, len(new))
        if result is None:
            event("append: out of blocks")
            return
        self.tokens[rid] = self.tokens[rid] + new
        self.write(result, rid, len(new))
        if data.draw(st.booleans(), "register"):
            self.bm.cache_blocks(rid, self.tokens[rid], len(self.tokens[rid]))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.live_ids()), "parent_id")
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:
        rid = data.draw(st.sampled_from(self.live_ids()), "request_id")
        self.bm.free(rid)
        del self.tokens[rid]

    @invariant()
    def native_bookkeeping_is_consistent(self) -> None:
        self.bm.check_invariants()

    @invariant()
    def refcounts_and_free_blocks(self) -> None:
        bm = self.bm
        owners = np.zeros(bm.num_blocks, dtype=np.int64)
        for rid in self.tokens:
            owners[bm.block_table(rid)] += 1
        refcounts = bm.refcounts()
        assert (refcounts >= 0).all() and refcounts.tolist() == owners.tolist()
        stack, lru = set(bm.free_blocks().tolist()), set(bm.evictable_blocks().tolist())
        assert not stack & lru
        assert stack | lru == set(np.flatnonzero(refcounts == 0).tolist())
        assert bm.num_free_blocks == len(stack) + len(lru)
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks

    @invariant()
    def every_request_reads_back_its_values(self) -> None:
        for rid, tokens in self.tokens.items():
            assert self.pool[self.bm.slot_mapping(rid)].tolist() == prefix_values(tokens)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in self.live_ids():
            self.bm.free(rid)
        bm = self.bm
        assert bm.num_free_blocks == bm.num_blocks and bm.num_requests == 0
        assert bm.refcounts().tolist() == [0] * bm.num_blocks
        bm.check_invariants()


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase

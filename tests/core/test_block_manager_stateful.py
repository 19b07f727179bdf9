"""Random sequences of allocate / append / fork / free against a pure-Python model.

The model knows nothing of physical block ids: it tracks each request's tokens and its
*logical* blocks with their refcounts, so it predicts admission, the blocks an append takes
(copy-on-write included) and the free count, without sharing the native code's logic.
Checked after every step:
  * the native check_invariants() and, independently from the public views: refcount of
    every block == number of block_tables holding it (never negative), the free list has no
    duplicates and holds exactly the blocks of refcount 0, free + used == num_blocks;
  * logical -> physical blocks is a bijection: two requests share a physical block exactly
    when the model says they share that block;
  * contents: a simulated pool, written through the returned slot_mapping and block_copies
    the way the engine would (copies first, then write_kv), reads back every request's
    tokens through its own slot_mapping, so no request can overwrite another's KV.
At the end everything is freed and the pool must be whole again.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from distserve_rt.core.block_manager import AllocStatus, BlockManager


class Model:
    """Requests as token lists over logical blocks (ids never reused) with refcounts."""

    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = watermark_blocks
        self.tokens: dict[int, list[int]] = {}
        self.tables: dict[int, list[int]] = {}
        self.refs: dict[int, int] = {}
        self._next_block = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self.refs)

    def _new_block(self) -> int:
        self._next_block += 1
        self.refs[self._next_block] = 1
        return self._next_block

    def can_allocate(self, num_tokens: int) -> AllocStatus:
        needed = math.ceil(num_tokens / self.block_size)
        if needed > self.num_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self.num_free - needed < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def allocate(self, rid: int, tokens: list[int]) -> None:
        self.tokens[rid] = list(tokens)
        self.tables[rid] = [
            self._new_block() for _ in range(math.ceil(len(tokens) / self.block_size))
        ]

    def fork(self, parent: int, child: int) -> None:
        self.tokens[child] = list(self.tokens[parent])
        self.tables[child] = list(self.tables[parent])
        for block in self.tables[child]:
            self.refs[block] += 1

    def free(self, rid: int) -> None:
        for block in self.tables.pop(rid):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
        del self.tokens[rid]

    def append(self, rid: int, tokens: list[int]) -> None:
        table = self.tables[rid]
        if len(self.tokens[rid]) % self.block_size and self.refs[table[-1]] > 1:
            self.refs[table[-1]] -= 1  # copy-on-write: this request leaves the shared block
            table[-1] = self._new_block()
        self.tokens[rid].extend(tokens)
        while len(table) < math.ceil(len(self.tokens[rid]) / self.block_size):
            table.append(self._new_block())


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.next_id = 0
        self.next_token = 1  # token values are unique and > 0; the pool starts at -1

    @initialize(
        num_blocks=st.integers(1, 24),
        block_size=st.sampled_from([8, 16, 32]),
        watermark=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    )
    def setup(self, num_blocks: int, block_size: int, watermark: float) -> None:
        self.bm = BlockManager(num_blocks, block_size=block_size, watermark=watermark)
        self.model = Model(num_blocks, block_size, int(watermark * num_blocks))
        self.pool = np.full(num_blocks * block_size, -1, dtype=np.int64)  # [num_slots]

    def fresh_tokens(self, count: int) -> list[int]:
        tokens = list(range(self.next_token, self.next_token + count))
        self.next_token += count
        return tokens

    def live_ids(self) -> list[int]:
        return sorted(self.model.tokens)

    def write(self, result, tokens: list[int]) -> None:
        """What the engine does with an AppendResult: copy_blocks, then write_kv."""
        bs = self.model.block_size
        for src, dst in result.block_copies.tolist():
            self.pool[dst * bs : (dst + 1) * bs] = self.pool[src * bs : (src + 1) * bs]
        self.pool[result.slot_mapping] = tokens

    # ---- rules ---------------------------------------------------------------------------

    @rule(data=st.data())
    def allocate(self, data) -> None:
        capacity = self.model.num_blocks * self.model.block_size
        # Mostly short prompts, so that several requests live at once and share blocks.
        short = st.integers(0, 3 * self.model.block_size)
        num_tokens = data.draw(short | st.integers(0, capacity + self.model.block_size))
        rid, self.next_id = self.next_id, self.next_id + 1
        expected = self.model.can_allocate(num_tokens)
        assert self.bm.can_allocate(num_tokens) is expected
        event(f"can_allocate {expected.name}")
        if expected is not AllocStatus.OK:
            try:
                self.bm.allocate(rid, num_tokens)
            except ValueError as exc:
                assert expected.name in str(exc)
            else:
                raise AssertionError(f"allocate succeeded although can_allocate is {expected}")
            return
        tokens = self.fresh_tokens(num_tokens)
        self.bm.allocate(rid, num_tokens)
        self.model.allocate(rid, tokens)
        self.pool[self.bm.slot_mapping(rid)] = tokens

    @precondition(lambda self: self.model.tokens)
    @rule(data=st.data())
    def append(self, data) -> None:
        rid = data.draw(st.sampled_from(self.live_ids()), "request_id")
        count = data.draw(st.integers(1, 2 * self.model.block_size), "num_new_tokens")
        self.append_batch_of([rid], [count], single=True)

    @precondition(lambda self: self.model.tokens)
    @rule(data=st.data())
    def append_batch(self, data) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.live_ids()), unique=True), "request_ids")
        counts = data.draw(
            st.none() | st.lists(st.integers(1, 20), min_size=len(ids), max_size=len(ids)),
            "num_new_tokens",
        )
        self.append_batch_of(ids, counts, single=False)

    def append_batch_of(self, ids: list[int], counts: list[int] | None, single: bool) -> None:
        counts_or_ones = counts if counts is not None else [1] * len(ids)
        after = copy.deepcopy(self.model)
        tokens = [self.fresh_tokens(n) for n in counts_or_ones]
        for rid, new_tokens in zip(ids, tokens, strict=True):
            after.append(rid, new_tokens)
        needed = len(after.refs) - len(self.model.refs)
        fits = needed <= self.model.num_free
        assert self.bm.num_blocks_to_append(ids, counts) == needed
        if single:
            assert self.bm.can_append_slots(ids[0], counts_or_ones[0]) is fits
            result = self.bm.append_slots(ids[0], counts_or_ones[0])
        else:
            result = self.bm.append_slots_batch(ids, counts)
        if not fits:
            event("append: out of blocks")
            assert result is None
            return
        assert result is not None
        event(f"append: {len(result.block_copies)} copies on write")
        self.model = after
        self.write(result, [t for new_tokens in tokens for t in new_tokens])
        expected_slots = [
            self.bm.slot_mapping(rid, self.bm.num_tokens(rid) - n)
            for rid, n in zip(ids, counts_or_ones, strict=True)
        ]
        assert result.slot_mapping.tolist() == np.concatenate([[], *expected_slots]).tolist()

    @precondition(lambda self: self.model.tokens)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.live_ids()), "parent_id")
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.model.fork(parent, child)

    @precondition(lambda self: self.model.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:
        rid = data.draw(st.sampled_from(self.live_ids()), "request_id")
        self.bm.free(rid)
        self.model.free(rid)

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def native_bookkeeping_is_consistent(self) -> None:
        self.bm.check_invariants()

    @invariant()
    def refcounts_and_free_list(self) -> None:
        bm = self.bm
        owners = np.zeros(bm.num_blocks, dtype=np.int64)
        for rid in self.model.tokens:
            table = bm.block_table(rid)
            assert len(set(table.tolist())) == len(table), f"request {rid} lists a block twice"
            owners[table] += 1
        refcounts = bm.refcounts()
        assert (refcounts >= 0).all()
        assert refcounts.tolist() == owners.tolist()
        free = bm.free_blocks().tolist()
        assert len(set(free)) == len(free), "free list has duplicates"
        assert set(free) == set(np.flatnonzero(refcounts == 0).tolist())
        assert bm.num_free_blocks == len(free) == self.model.num_free
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_requests == len(self.model.tokens)

    @invariant()
    def sharing_matches_the_model(self) -> None:
        physical_of: dict[int, int] = {}
        for rid, logical_table in self.model.tables.items():
            table = self.bm.block_table(rid).tolist()
            assert len(table) == len(logical_table)
            assert self.bm.num_tokens(rid) == len(self.model.tokens[rid])
            for logical, physical in zip(logical_table, table, strict=True):
                assert physical_of.setdefault(logical, physical) == physical
        assert len(set(physical_of.values())) == len(physical_of), "distinct blocks merged"

    @invariant()
    def every_request_reads_back_its_tokens(self) -> None:
        for rid, tokens in self.model.tokens.items():
            assert self.pool[self.bm.slot_mapping(rid)].tolist() == tokens

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in self.live_ids():
            self.bm.free(rid)
        bm = self.bm
        assert bm.num_free_blocks == bm.num_blocks and bm.num_requests == 0
        assert bm.refcounts().tolist() == [0] * bm.num_blocks
        assert sorted(bm.free_blocks().tolist()) == list(range(bm.num_blocks))
        bm.check_invariants()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase

"""The decode instance's prefix cache under random migrations, pulls landing, decode steps
(with preemption by recompute in a small pool), finishes and local prefills (conditional
disaggregation).

A migration is pulled the way `DecodeInstance` does it: only the blocks after the ones
`admit_migrations` found cached (``reused_tokens``) are written. The simulated pool holds at
each slot a value that depends on the token and every token before it (as real KV does), so
a cached block reused after a different prefix, or a delta pull that skipped a block the
pool did not really hold, reads back wrong values. Checked after every step: every request
with KV reads back exactly its own values, refcounts, free + used == num_blocks and the
native check_invariants(); at the end everything is finished and the pool whole again.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import DecodeScheduler, SchedulerConfig
from distserve_rt.sampling_params import SamplingParams
from tests.core.test_prefix_cache_stateful import prefix_values

MAX_LEN = 96
PARAMS = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


class DecodeCacheMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(6, 20),
        block_size=st.sampled_from([8, 16]),
        hash_bits=st.sampled_from([64, 2]),
    )
    def setup(self, num_blocks: int, block_size: int, hash_bits: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, 0.0, True, hash_bits)
        config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN)
        self.scheduler = DecodeScheduler(config, self.bm)
        self.bs = block_size
        self.pool = np.full(num_blocks * block_size, -1, dtype=np.int64)
        # A conversation: later prompts extend earlier ones, so migrations hit the cache.
        self.doc = [(7 * i) % 3 for i in range(MAX_LEN)]
        self.ids = itertools.count()
        self.live: dict[str, Request] = {}
        self.now = 0.0

    # ---- helpers ----------------------------------------------------------------------

    def slot(self, request: Request, position: int) -> int:
        table = self.bm.block_table(request.seq_id)
        return int(table[position // self.bs]) * self.bs + position % self.bs

    def reads_back(self, request: Request, end: int) -> bool:
        want = prefix_values(request.token_ids)[:end]
        return [int(self.pool[self.slot(request, p)]) for p in range(end)] == want

    def new_request(self, num_tokens: int, variant: int) -> Request:
        seq_id = next(self.ids)
        tokens = self.doc[:num_tokens]
        if variant:  # a different last block: same leading blocks, different tail
            tokens = tokens[:-1] + [3 + variant]
        return Request(f"r{seq_id}", seq_id, tokens, PARAMS, self.now, MAX_LEN)

    # ---- rules ------------------------------------------------------------------------

    @rule(num_tokens=st.integers(2, 60), variant=st.integers(0, 2))
    def announce(self, num_tokens: int, variant: int) -> None:
        request = self.new_request(num_tokens, variant)
        request.append_token(1, self.now)  # the first token, sampled by the prefill instance
        request.num_computed_tokens = request.num_tokens - 1
        self.scheduler.add_migrated(request)
        self.live[request.request_id] = request

    @rule(num_tokens=st.integers(2, 60), variant=st.integers(0, 2))
    def prefill_locally(self, num_tokens: int, variant: int) -> None:
        request = self.new_request(num_tokens, variant)
        self.scheduler.add_request(request)
        self.live[request.request_id] = request

    @rule()
    def admit_and_pull(self) -> None:
        """Admits what fits and writes only the blocks not found cached (the delta pull)."""
        for request in self.scheduler.admit_migrations(self.now):
            reused = self.scheduler.reused_tokens[request.request_id]
            assert reused % self.bs == 0 and reused < request.num_computed_tokens
            assert self.reads_back(request, reused), "a reused block holds other KV"
            values = prefix_values(request.token_ids)
            for p in range(reused, request.num_computed_tokens):
                self.pool[self.slot(request, p)] = values[p]

    @precondition(lambda self: self.scheduler.pulling)
    @rule(data=st.data())
    def land(self, data) -> None:
        # By seq_id, not id(): the order must replay identically (memory addresses do not).
        pulling = sorted(self.scheduler.pulling.values(), key=lambda r: r.seq_id)
        request = data.draw(st.sampled_from(pulling))
        self.scheduler.complete_migration(request)

    @rule()
    def step(self) -> None:
        self.now += 1.0
        out = self.scheduler.schedule(self.now)
        slots = iter(out.slot_mapping.tolist())
        for chunk in out.prefills:
            values = prefix_values(chunk.request.token_ids)
            for p in range(chunk.prefix_len, chunk.prefix_len + chunk.num_new_tokens):
                self.pool[next(slots)] = values[p]
        for request in out.decodes:
            self.pool[next(slots)] = prefix_values(request.token_ids)[request.num_tokens - 1]
        sampled = [(r.num_tokens * 5) % 3 for r in out.sampling_requests()]
        self.scheduler.update_from_output(out, sampled, None, self.now)
        for request in list(out.sampling_requests()):
            if request.num_tokens >= MAX_LEN - 8 and request.status is RequestStatus.RUNNING:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH, self.now)
        for request in out.finished:
            self.live.pop(request.request_id, None)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data) -> None:
        request = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda r: r.seq_id)))
        if request.request_id in self.scheduler.pulling:
            self.scheduler.drop_migration(request, RequestStatus.FINISHED_ABORTED, self.now)
        elif not request.is_finished:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, self.now)
        del self.live[request.request_id]

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def kv_reads_back(self) -> None:
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_blocks
        assert (self.bm.refcounts() >= 0).all()
        for request in self.scheduler.running:
            if request.status is RequestStatus.RUNNING:
                assert self.reads_back(request, request.num_computed_tokens)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for request in list(self.live.values()):
            if request.request_id in self.scheduler.pulling:
                self.scheduler.drop_migration(request, RequestStatus.FINISHED_ABORTED, self.now)
            elif not request.is_finished:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED, self.now)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_requests == 0


DecodeCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDecodeCacheMachine = DecodeCacheMachine.TestCase


def test_blocks_decoded_here_are_reused_by_the_next_turn():
    """Turn 1 migrates 20 tokens of KV (2 full blocks registered when the pull lands) and
    decodes 4 more (filling block 2, registered by the step that filled it); turn 2, whose
    prompt extends turn 1's tokens, finds all 3 blocks cached and pulls from block 3 on."""
    bm = BlockManager(16, 8, 0.0, True)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN)
    scheduler = DecodeScheduler(config, bm)
    first = Request("t1", 0, list(range(20)), PARAMS, 0.0, MAX_LEN)
    first.append_token(20, 0.0)
    first.num_computed_tokens = 20
    scheduler.add_migrated(first)
    assert scheduler.admit_migrations(0.0) == [first] and scheduler.reused_tokens["t1"] == 0
    scheduler.complete_migration(first)
    assert bm.num_cached_blocks == 2
    for t in range(21, 25):  # decode steps write the KV of positions 20..23, sample t
        out = scheduler.schedule(float(t))
        scheduler.update_from_output(out, [t], None, float(t))
    assert bm.num_cached_blocks == 3  # the step that wrote position 23 filled block 2
    turn_one = bm.block_table(first.seq_id)[:3].tolist()
    scheduler.finish_request(first, RequestStatus.FINISHED_LENGTH, 29.0)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 16
    second = Request("t2", 1, first.token_ids[:-1] + [90, 91, 92], PARAMS, 30.0, MAX_LEN)
    second.append_token(93, 30.0)
    second.num_computed_tokens = second.num_tokens - 1
    scheduler.add_migrated(second)
    assert scheduler.admit_migrations(30.0) == [second]
    assert scheduler.reused_tokens["t2"] == 24
    assert bm.block_table(second.seq_id)[:3].tolist() == turn_one

"""Continuous batching and chunked prefill: ordering, budgets, chunking, preemption, abort,
rejection; every step's KV bookkeeping checked against the block manager."""

from __future__ import annotations

import pytest

from distserve_rt.core.request import RequestStatus
from tests.core.scheduler_helpers import (
    make,
    request,
    run_to_completion,
    step,
    unconstrained_tokens,
)

POLICIES = ["continuous_batching", "chunked_prefill"]


def test_continuous_batching_prefill_first_then_decode():
    s, bm = make("continuous_batching", max_num_batched_tokens=128)
    reqs = [request(10, max_tokens=5) for _ in range(3)]
    for r in reqs:
        s.add_request(r)
    out = step(s, bm)
    assert [p.request for p in out.prefills] == reqs and not out.decodes
    assert all(p.produces_token and p.prefix_len == 0 for p in out.prefills)
    assert out.num_prefill_tokens == 30
    out = step(s, bm)
    assert not out.prefills and out.decodes == reqs
    late = request(4)
    s.add_request(late)
    out = step(s, bm)  # a waiting request that fits preempts the decode step
    assert [p.request for p in out.prefills] == [late] and not out.decodes
    out = step(s, bm)
    assert out.decodes == [*reqs, late]


def test_continuous_batching_token_budget_and_max_num_seqs():
    s, bm = make("continuous_batching", max_num_batched_tokens=128, max_num_seqs=16)
    for _ in range(5):
        s.add_request(request(50))
    out = step(s, bm)
    assert len(out.prefills) == 2 and out.num_prefill_tokens == 100  # a third would be 150
    s2, bm2 = make("continuous_batching", max_num_seqs=3)
    for _ in range(5):
        s2.add_request(request(5, max_tokens=20))
    assert len(step(s2, bm2).prefills) == 3
    for _ in range(4):
        out = step(s2, bm2)
        assert not out.prefills and len(out.decodes) == 3


def test_chunked_prefill_chunks_and_decodes_first():
    s, bm = make("chunked_prefill", max_num_batched_tokens=8)
    a, b = request(3, max_tokens=10), request(20, max_tokens=3)
    s.add_request(a)
    out = step(s, bm)
    assert [(p.request, p.num_new_tokens) for p in out.prefills] == [(a, 3)]
    s.add_request(b)
    chunks = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        out = step(s, bm)
        assert out.num_tokens <= 8
        assert out.decodes == [a]  # the running decode goes first, every step
        (chunk,) = out.prefills
        chunks.append((chunk.prefix_len, chunk.num_new_tokens, chunk.produces_token))
        assert len(b.output_token_ids) == int(chunk.produces_token)  # only the last samples
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    out = step(s, bm)
    assert out.decodes == [a, b] and not out.prefills


def test_chunked_prefill_continues_partial_before_new():
    s, bm = make("chunked_prefill", max_num_batched_tokens=10)
    a, b = request(15), request(4)
    s.add_request(a)
    s.add_request(b)
    out = step(s, bm)
    assert [(p.request, p.num_new_tokens) for p in out.prefills] == [(a, 10)]
    out = step(s, bm)
    assert [(p.request, p.prefix_len, p.num_new_tokens) for p in out.prefills] == [
        (a, 10, 5),
        (b, 0, 4),
    ]
    assert out.prefill_block_tables is not None and out.prefill_block_tables.shape[0] == 2


@pytest.mark.parametrize("policy", POLICIES)
def test_preemption_by_recompute_loses_nothing(policy):
    # 10 blocks of 8 tokens; 6 requests growing to 40 tokens (5 blocks) each.
    s, bm = make(policy, num_blocks=10, max_num_batched_tokens=64, max_model_len=64)
    reqs = [request(12, max_tokens=28, arrival=float(i)) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    run_to_completion(s, bm)
    assert sum(r.num_preemptions for r in reqs) > 0
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == unconstrained_tokens(r)
    assert bm.num_used_blocks == 0 and bm.num_requests == 0
    bm.check_invariants()


@pytest.mark.parametrize("policy", POLICIES)
def test_preemption_victim_is_most_recent_arrival(policy):
    s, bm = make(policy, num_blocks=4, max_num_batched_tokens=64, max_model_len=64)
    early, late = request(15, max_tokens=20, arrival=1.0), request(15, max_tokens=20, arrival=2.0)
    s.add_request(early)
    s.add_request(late)
    while True:
        out = step(s, bm)
        if out.preempted:
            break
    assert out.preempted == [late] and late.status is RequestStatus.PREEMPTED
    assert late.num_computed_tokens == 0 and late.seq_id not in bm and s.waiting[0] is late
    assert early in out.decodes


@pytest.mark.parametrize("policy", POLICIES)
def test_abort_anywhere_frees_blocks(policy):
    budget = 16 if policy == "chunked_prefill" else 64
    s, bm = make(policy, max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=64)
    decoding, partial, waiting = request(4, max_tokens=30), request(40), request(4)
    s.add_request(decoding)
    step(s, bm)
    s.add_request(partial)
    step(s, bm)
    s.add_request(waiting)
    if policy == "chunked_prefill":
        assert 0 < partial.num_computed_tokens < partial.num_tokens  # mid-prefill
    for r in (decoding, partial, waiting):
        assert s.abort_request(r.request_id, 5.0) is r
        assert r.status is RequestStatus.FINISHED_ABORTED and r.seq_id not in bm
    assert s.abort_request(decoding.request_id, 6.0) is None
    out = step(s, bm)
    assert out.is_empty and set(out.finished) == {decoding, partial, waiting}
    assert bm.num_used_blocks == 0 and not s.has_unfinished_requests()


@pytest.mark.parametrize("policy", POLICIES)
def test_requests_that_never_fit_finish_with_error(policy):
    s, bm = make(policy, num_blocks=4, max_model_len=64, max_num_batched_tokens=64)
    too_long, too_big, ok = request(64), request(40), request(5, max_tokens=3)
    for r in (too_long, too_big, ok):
        s.add_request(r)
    run_to_completion(s, bm)
    assert too_long.status is RequestStatus.FINISHED_ERROR and "max_model_len" in too_long.error
    assert too_big.status is RequestStatus.FINISHED_ERROR and "KV cache" in too_big.error
    assert ok.status is RequestStatus.FINISHED_LENGTH and len(ok.output_token_ids) == 3


def test_config_checks():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make("continuous_batching", max_num_batched_tokens=64, max_model_len=128)
    with pytest.raises(ValueError, match="max_num_seqs"):
        make("chunked_prefill", max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="policy"):
        make("fifo")


@pytest.mark.parametrize("policy", POLICIES)
def test_decode_into_a_shared_block_carries_the_copy_in_the_step(policy):
    """A decode append into a block another request shares (a fork) takes a new block and
    the step carries the (src, dst) copy for the runner: never dropped, so the shared
    block keeps the KV its other owner reads."""
    s, bm = make(policy)
    r = request(5)  # a partial block: its next token goes into the shared block
    s.add_request(r)
    step(s, bm)
    shared = int(bm.block_table(r.seq_id)[-1])
    bm.fork(r.seq_id, 1 << 30)
    out = s.schedule(1.0)
    assert out.decodes == [r]
    new = int(bm.block_table(r.seq_id)[-1])
    assert out.block_copies.tolist() == [[shared, new]] and new != shared
    assert int(bm.block_table(1 << 30)[-1]) == shared
    assert s.schedule(2.0).block_copies.shape == (0, 2)  # once: the next step has none

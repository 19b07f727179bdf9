"""Property test: any mix of arrivals, aborts and steps keeps the scheduler's invariants.

Blocks are conserved (the block manager's used blocks are exactly those of the requests
holding KV), no request is lost (each live request sits in exactly one queue, each finished
one is reported once), and num_computed_tokens agrees with the request's state and the
block manager. A run always drains: every request finishes.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve_rt.core.request import RequestStatus
from tests.core.scheduler_helpers import make, request, step

OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 24)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("step"), st.just(0), st.just(0)),
)


def check_invariants(s, bm, all_requests, reported):
    bm.check_invariants()
    queues = [*s.waiting, *(r for r in s.running if r.status is RequestStatus.RUNNING)]
    queues += s.prefilling
    assert len(queues) == len({id(r) for r in queues}), "a request sits in two queues"
    live = {id(r) for r in queues}
    num_blocks = 0
    for r in all_requests:
        if r.is_finished:
            assert id(r) not in live and r.seq_id not in bm
            continue
        assert id(r) in live, f"{r} is lost"
        if r.status is RequestStatus.RUNNING:
            held = bm.num_tokens(r.seq_id)
            if r in s.prefilling:
                assert 0 < r.num_computed_tokens < r.num_tokens == held
            else:
                assert r.num_computed_tokens == held == r.num_tokens - 1
            num_blocks += -(-held // bm.block_size)
        else:
            assert r.num_computed_tokens == 0 and r.seq_id not in bm
    assert bm.num_used_blocks == num_blocks, "blocks leaked or double-counted"
    assert len(reported) == len(set(map(id, reported)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["continuous_batching", "chunked_prefill"]),
    num_blocks=st.integers(2, 16),
    budget=st.integers(8, 64),
    ops=st.lists(OPS, max_size=60),
)
def test_scheduler_invariants(policy, num_blocks, budget, ops):
    budget = budget if policy == "chunked_prefill" else 64
    s, bm = make(
        policy,
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
        max_model_len=64,
    )
    requests, reported = [], []
    now = 0.0
    for op, a, b in ops:
        now += 1.0
        if op == "add":
            requests.append(request(a, max_tokens=b, arrival=now, max_model_len=64))
            s.add_request(requests[-1])
        elif op == "abort" and requests:
            s.abort_request(requests[a % len(requests)].request_id, now)
        else:
            reported += step(s, bm, now).finished
        check_invariants(s, bm, requests, reported)
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        now += 1.0
        reported += step(s, bm, now).finished
        check_invariants(s, bm, requests, reported)
    assert not s.has_unfinished_requests() and bm.num_used_blocks == 0
    assert all(r.is_finished for r in requests)
    errors_and_aborts = {id(r) for r in requests if r.finish_reason in ("error", "abort")}
    assert errors_and_aborts == {id(r) for r in reported}

"""Property test: parallel sampling (requests with forks) under any mix of arrivals, aborts
and steps, both policies, pools small enough to preempt.

Blocks are conserved with sharing: the used blocks are exactly the distinct blocks of the
sequences holding KV (a forked prompt's blocks counted once), refcounts match the tables;
every copy-on-write pair copies a block into one that only its new owner holds; a fork
never waits outside its request's group; a group counts whole against max_num_seqs; and
every run drains with every block back.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve_rt.core.request import RequestStatus
from tests.core.scheduler_helpers import make, request, step

OPS = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 16), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
    st.tuples(st.just("step"), st.just(0), st.just(0), st.just(0)),
)


def group(num_prompt: int, max_tokens: int, num_forks: int, now: float):
    """A request and its `num_forks` pending forks (same prompt, their own seq ids)."""
    parent = request(num_prompt, max_tokens=max_tokens, arrival=now, max_model_len=64)
    forks = [request(num_prompt, max_tokens=max_tokens, arrival=now, max_model_len=64)
             for _ in range(num_forks)]  # fmt: skip
    for child in forks:
        child.token_ids = list(parent.token_ids)
    parent.forks = forks
    return [parent, *forks]


def check_invariants(s, bm, sequences, out=None):
    bm.check_invariants()
    queued = [*s.waiting, *s.prefilling]
    queued += [r for r in s.running if r.status is RequestStatus.RUNNING]
    pending = {id(c) for r in queued for c in r.forks}
    live = {id(r) for r in queued}
    blocks = set()
    for r in sequences:
        if r.is_finished:
            assert id(r) not in live and r.seq_id not in bm
            continue
        assert id(r) in live or id(r) in pending, f"{r} is lost"
        if r.status is RequestStatus.RUNNING:
            blocks.update(bm.block_table(r.seq_id).tolist())
    assert bm.num_used_blocks == len(blocks), "blocks leaked or double-counted"
    # A group is admitted whole: its forks will run, so they count against max_num_seqs.
    running = [r for r in s.running if r.status is RequestStatus.RUNNING]
    assert len(running) + sum(r.num_seqs for r in s.prefilling) <= s.config.max_num_seqs
    if out is not None and len(out.block_copies):
        refcounts = bm.refcounts()
        for src, dst in out.block_copies.tolist():
            # At most its one new owner (which may have finished at this step's token).
            assert src != dst and refcounts[dst] <= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["continuous_batching", "chunked_prefill"]),
    num_blocks=st.integers(6, 20),
    budget=st.integers(8, 64),
    ops=st.lists(OPS, max_size=50),
)
def test_forked_groups_keep_the_scheduler_invariants(policy, num_blocks, budget, ops):
    budget = budget if policy == "chunked_prefill" else 64
    s, bm = make(
        policy, num_blocks=num_blocks, max_num_batched_tokens=budget, max_num_seqs=4,
        max_model_len=64,
    )  # fmt: skip
    sequences, parents, now = [], [], 0.0
    for op, a, b, c in ops:
        now += 1.0
        if op == "add":
            new = group(a, b, c, now)
            sequences += new
            parents.append(new[0])
            s.add_request(new[0])
            check_invariants(s, bm, sequences)
        elif op == "abort" and parents:
            s.abort_request(parents[a % len(parents)].request_id, now)
            check_invariants(s, bm, sequences)
        else:
            out = step(s, bm, now)
            check_invariants(s, bm, sequences, out)
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        now += 1.0
        out = step(s, bm, now)
        check_invariants(s, bm, sequences, out)
    assert not s.has_unfinished_requests() and bm.num_used_blocks == 0
    assert all(r.is_finished for r in sequences)


def test_a_group_forks_at_its_prompt_s_last_chunk_and_copies_once_per_sharer():
    """The example the property generalises: 3 sequences of a 13-token prompt (block 8)
    share its 2 blocks after the prefill; the first decode copies the partial block for
    2 of them, and the full block stays shared."""
    s, bm = make("chunked_prefill", max_num_batched_tokens=8)
    sequences = group(13, 4, 2, 0.0)
    s.add_request(sequences[0])
    first = step(s, bm)  # 8 of 13 tokens: no fork yet
    assert not first.prefills[0].forks and bm.num_requests == 1
    second = step(s, bm)
    assert second.prefills[0].forks == sequences[1:]
    assert [len(r.output_token_ids) for r in sequences] == [1, 1, 1]
    table = bm.block_table(sequences[0].seq_id)
    assert bm.num_used_blocks == 2 and bm.refcounts()[table].tolist() == [3, 3]
    third = step(s, bm)
    assert len(third.block_copies) == 2 and bm.num_used_blocks == 4
    check_invariants(s, bm, sequences, third)


def test_a_group_waits_until_all_its_sequences_fit_max_num_seqs():
    for policy in ("continuous_batching", "chunked_prefill"):
        s, bm = make(policy, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
        alone = request(5, max_tokens=3)
        s.add_request(alone)
        step(s, bm)
        sequences = group(5, 3, 3, 1.0)  # 4 sequences: 1 + 4 > max_num_seqs
        s.add_request(sequences[0])
        out = step(s, bm, 2.0)
        assert not out.prefills and sequences[0].status is RequestStatus.WAITING, policy
        while alone.status is RequestStatus.RUNNING:
            step(s, bm, 3.0)
        assert step(s, bm, 4.0).prefills[0].forks == sequences[1:], policy

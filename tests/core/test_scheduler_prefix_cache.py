"""Schedulers with prefix caching: a prompt whose first blocks are cached starts with them
counted as computed (the first chunk reads them through the block table), blocks become
shareable only after the step that wrote them, preemption by recompute hits its own blocks,
and caching off changes nothing."""

from __future__ import annotations

import itertools

import pytest

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import PrefillScheduler, SchedulerConfig, make_scheduler
from distserve_rt.sampling_params import SamplingParams
from tests.engine.fakes import check_scheduler_output, history_token

BS = 8
SHARED = [3 + i % 40 for i in range(2 * BS + 3)]  # 2 full blocks, then a partial one
_ids = itertools.count()


def make(policy: str, caching: bool = True, num_blocks: int = 32, budget: int = 128):
    bm = BlockManager(num_blocks, BS, 0.0, enable_prefix_caching=caching)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=128)
    if policy == "prefill":
        return PrefillScheduler(config, bm), bm
    return make_scheduler(policy, config, bm), bm


def request(prompt: list[int], max_tokens: int = 100) -> Request:
    seq_id = next(_ids)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(f"r{seq_id}", seq_id, prompt, params, 0.0, 128)


def step(scheduler, bm, now: float = 0.0):
    """schedule -> (the model would run here) -> update_from_output, as the engine does."""
    out = scheduler.schedule(now)
    check_scheduler_output(out, bm)
    tokens = [history_token(r.token_ids) for r in out.sampling_requests()]
    update = scheduler.update_from_output(out, tokens, None, now)
    for r in update.updated:  # no StopChecker here: finish by length as the engine would
        if not r.is_finished and r.num_tokens >= r.max_num_tokens:
            scheduler.finish_request(r, RequestStatus.FINISHED_LENGTH, now)
    return out


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill", "prefill"])
def test_shared_prefix_is_not_recomputed(policy):
    scheduler, bm = make(policy)
    scheduler.add_request(request(SHARED))
    step(scheduler, bm)
    second = request(SHARED[: 2 * BS] + [45, 46, 47, 48, 49])
    scheduler.add_request(second)
    out = step(scheduler, bm, 1.0)
    chunk = next(p for p in out.prefills if p.request is second)
    assert (chunk.prefix_len, chunk.num_new_tokens) == (2 * BS, 5)
    assert out.prefill_block_tables is not None  # the chunk reads its prefix from the cache
    stats = bm.stats()
    assert stats.prefix_cache_hits == 2 * BS
    assert stats.prefix_cache_queries == len(SHARED) + second.num_prompt_tokens


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_blocks_are_shared_only_after_the_step_that_wrote_them(policy):
    scheduler, bm = make(policy)
    first, twin = request(SHARED), request(SHARED)
    scheduler.add_request(first)
    scheduler.add_request(twin)
    out = scheduler.schedule(0.0)
    assert [p.prefix_len for p in out.prefills] == [0, 0]  # same step: nothing written yet
    assert bm.num_cached_blocks == 0
    tokens = [history_token(r.token_ids) for r in out.sampling_requests()]
    scheduler.update_from_output(out, tokens, None, 0.0)
    assert bm.num_cached_blocks == 2  # the twin's equal blocks are not registered twice


def test_decode_filled_blocks_are_cached_and_survive_the_request():
    scheduler, bm = make("chunked_prefill")
    first = request(SHARED[: BS + 6], max_tokens=6)  # decodes fill block 1
    scheduler.add_request(first)
    while scheduler.has_unfinished_requests():
        step(scheduler, bm)
    assert bm.num_cached_blocks == 2 and bm.num_requests == 0
    follow_up = request(first.token_ids + [7, 7])  # the next turn of a conversation
    scheduler.add_request(follow_up)
    out = step(scheduler, bm)
    assert out.prefills[0].prefix_len == 2 * BS


def test_recompute_after_preemption_hits_its_own_blocks():
    scheduler, bm = make("continuous_batching", num_blocks=6)
    a, b = request(SHARED[: 2 * BS + 1], max_tokens=12), request([9] * (BS + 1), max_tokens=12)
    scheduler.add_request(a)
    scheduler.add_request(b)
    preempted = None
    for now in range(30):
        out = step(scheduler, bm, float(now))
        if out.preempted:
            preempted = out.preempted[0]
            break
    assert preempted is b  # the later arrival
    while not any(p.request is b for p in out.prefills):
        out = step(scheduler, bm, 40.0)
    chunk = next(p for p in out.prefills if p.request is b)
    assert chunk.prefix_len >= BS  # its own first block survived as cache
    assert chunk.produces_token  # the rest of it, in one chunk


def test_caching_off_recomputes_everything():
    scheduler, bm = make("chunked_prefill", caching=False)
    scheduler.add_request(request(SHARED))
    step(scheduler, bm)
    scheduler.add_request(request(SHARED))
    out = step(scheduler, bm)
    assert out.prefills[0].prefix_len == 0
    assert bm.num_cached_blocks == 0 and bm.stats().prefix_cache_queries == 0


def test_prefill_instance_caches_after_migration_release():
    scheduler, bm = make("prefill")
    first = request(SHARED)
    scheduler.add_request(first)
    step(scheduler, bm)
    assert scheduler.num_awaiting_migration == 1
    scheduler.release_migration(first.request_id)
    assert bm.num_requests == 0 and len(bm.evictable_blocks()) == 2
    second = request(SHARED)
    scheduler.add_request(second)
    out = step(scheduler, bm)
    assert out.prefills[0].prefix_len == 2 * BS
    # What decode pulls: the whole prompt's blocks, cached ones included.
    assert len(scheduler.block_ids(second)) == 3

"""PrefillScheduler and DecodeScheduler without a model: FCFS token budget, KV held until
migrated, back-pressure, leases, admission of migrations, preemption by recompute."""

from __future__ import annotations

import itertools

import pytest

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import DecodeScheduler, PrefillScheduler, SchedulerConfig
from distserve_rt.sampling_params import SamplingParams
from tests.engine.fakes import check_scheduler_output

_ids = itertools.count()
BLOCK = 8


def _request(num_prompt: int, arrival: float = 0.0, max_tokens: int = 8) -> Request:
    seq_id = next(_ids)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompt = [3 + (seq_id + i) % 50 for i in range(num_prompt)]
    return Request(f"r{seq_id}", seq_id, prompt, params, arrival, 128)


def _prefill(num_blocks: int, budget: int = 32) -> tuple[PrefillScheduler, BlockManager]:
    bm = BlockManager(num_blocks, BLOCK, 0.0)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=128)
    return PrefillScheduler(config, bm), bm


def _run_prefill_step(scheduler: PrefillScheduler, bm: BlockManager, now: float) -> list[Request]:
    out = scheduler.schedule(now)
    check_scheduler_output(out, bm)
    assert not out.decodes
    done = out.sampling_requests()
    for request in done:
        request.append_token(7, now)
        scheduler.start_migration(request, now)
    return done


def test_prefill_batches_fcfs_up_to_the_budget_and_a_long_prompt_alone():
    scheduler, bm = _prefill(num_blocks=64, budget=32)
    reqs = [_request(n) for n in (10, 20, 5, 40, 3)]
    for r in reqs:
        scheduler.add_request(r)
    assert _run_prefill_step(scheduler, bm, 1.0) == reqs[:2]  # 10 + 20; 5 more would pass 32
    assert _run_prefill_step(scheduler, bm, 2.0) == reqs[2:3]  # 5; then 40 > budget left
    assert _run_prefill_step(scheduler, bm, 3.0) == reqs[3:4]  # 40 > L_m runs alone
    assert _run_prefill_step(scheduler, bm, 4.0) == reqs[4:]
    assert scheduler.num_awaiting_migration == 5 and scheduler.num_waiting == 0


def test_prefill_back_pressure_holds_kv_until_released():
    scheduler, bm = _prefill(num_blocks=4)  # 32 tokens of KV
    reqs = [_request(15) for _ in range(3)]  # 2 blocks each
    for r in reqs:
        scheduler.add_request(r)
    assert _run_prefill_step(scheduler, bm, 1.0) == reqs[:2]
    assert bm.num_free_blocks == 0
    for t in (2.0, 3.0):  # nobody pulls: the pool is full of awaiting KV, admission stops
        assert _run_prefill_step(scheduler, bm, t) == []
        assert scheduler.num_waiting == 1 and reqs[2].status is RequestStatus.WAITING
    with pytest.raises(ValueError, match="awaits migration"):
        scheduler.finish_request(reqs[0], RequestStatus.FINISHED_ABORTED, 3.0)
    assert scheduler.abort_request(reqs[0].request_id, 3.0) is None  # decode may be reading
    assert scheduler.release_migration(reqs[0].request_id) is reqs[0]
    assert scheduler.release_migration(reqs[0].request_id) is None
    assert _run_prefill_step(scheduler, bm, 4.0) == reqs[2:]
    for r in reqs[1:]:
        scheduler.release_migration(r.request_id)
    assert bm.num_free_blocks == 4 and not scheduler.has_unfinished_requests()


def test_prefill_leases_expire_once_in_start_order():
    scheduler, bm = _prefill(num_blocks=16)
    a, b = _request(4), _request(4)
    scheduler.add_request(a)
    _run_prefill_step(scheduler, bm, 1.0)
    scheduler.add_request(b)
    _run_prefill_step(scheduler, bm, 2.0)
    assert scheduler.expired_leases(1.5, timeout_s=1.0) == []
    assert scheduler.expired_leases(2.5, timeout_s=1.0) == [a]
    assert scheduler.expired_leases(3.5, timeout_s=1.0) == [b]  # a is not reported again
    assert scheduler.expired_leases(9.0, timeout_s=1.0) == []
    assert bm.num_used_blocks == 2  # expiry alone frees nothing: the decode side must answer


def _decode(num_blocks: int, watermark: float = 0.0) -> tuple[DecodeScheduler, BlockManager]:
    bm = BlockManager(num_blocks, BLOCK, watermark)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=128)
    return DecodeScheduler(config, bm), bm


def _migrated(num_prompt: int, arrival: float, max_tokens: int = 8) -> Request:
    request = _request(num_prompt, arrival, max_tokens)
    request.append_token(9, arrival)  # the first token, sampled by prefill
    request.num_computed_tokens = request.num_tokens - 1
    return request


def _decode_step(scheduler: DecodeScheduler, bm: BlockManager, now: float):
    out = scheduler.schedule(now)
    check_scheduler_output(out, bm)
    for r in out.sampling_requests():
        r.append_token(11, now)
        if r.num_tokens >= r.max_num_tokens:
            scheduler.finish_request(r, RequestStatus.FINISHED_LENGTH, now)
    return out


def test_decode_admits_migrations_when_blocks_are_free_and_decodes_them():
    scheduler, bm = _decode(num_blocks=4)
    a, b = _migrated(15, 0.0), _migrated(20, 1.0)  # 2 and 3 blocks of prompt KV
    scheduler.add_migrated(a)
    scheduler.add_migrated(b)
    assert scheduler.admit_migrations(1.0) == [a]  # b's 3 blocks do not fit next to a's 2
    assert scheduler.num_waiting == 1 and scheduler.num_running == 1
    assert _decode_step(scheduler, bm, 1.0).is_empty  # a is still being pulled
    scheduler.complete_migration(a)
    out = _decode_step(scheduler, bm, 2.0)
    assert out.decodes == [a] and list(out.decode_seq_lens) == [16]  # 15 pulled + first
    while a.status is RequestStatus.RUNNING:
        _decode_step(scheduler, bm, 3.0)
    assert a.num_output_tokens == 8 and scheduler.admit_migrations(4.0) == [b]
    scheduler.drop_migration(b, RequestStatus.FINISHED_ERROR, 5.0)  # the pull failed
    assert bm.num_free_blocks == 4 and not scheduler.has_unfinished_requests()


def test_decode_preempts_by_recompute_locally_when_blocks_run_out():
    scheduler, bm = _decode(num_blocks=4)
    a, b = _migrated(16, 0.0, max_tokens=12), _migrated(16, 1.0, max_tokens=12)
    for r in (a, b):
        scheduler.add_migrated(r)
    assert scheduler.admit_migrations(0.0) == [a, b]  # 2 blocks each: the pool is full
    for r in (a, b):
        scheduler.complete_migration(r)
    out = _decode_step(scheduler, bm, 1.0)  # both need a third block: b (latest) is preempted
    assert out.decodes == [a] and out.preempted == [b] and b.num_computed_tokens == 0
    while a.status is RequestStatus.RUNNING:
        _decode_step(scheduler, bm, 2.0)
    out = _decode_step(scheduler, bm, 3.0)  # b recomputes prompt + generated tokens here
    assert [p.request for p in out.prefills] == [b]
    assert out.prefills[0].num_new_tokens == b.num_tokens - 1
    while b.status is RequestStatus.RUNNING:
        _decode_step(scheduler, bm, 4.0)
    assert b.num_output_tokens == 12 and bm.num_free_blocks == 4


def test_decode_rejects_a_migration_that_never_fits_and_guards_pulls():
    scheduler, bm = _decode(num_blocks=2)
    big, small = _migrated(40, 0.0), _migrated(4, 1.0)
    scheduler.add_migrated(big)
    scheduler.add_migrated(small)
    assert scheduler.admit_migrations(0.0) == [small]
    assert big.status is RequestStatus.FINISHED_ERROR and "decode instance" in big.error
    assert scheduler.schedule(1.0).finished == [big]
    assert scheduler.abort_request(small.request_id, 1.0) is None  # its transfer writes blocks
    with pytest.raises(ValueError, match="being pulled"):
        scheduler.finish_request(small, RequestStatus.FINISHED_ABORTED, 1.0)
    bad = _request(4)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        scheduler.add_migrated(bad)

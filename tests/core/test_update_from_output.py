"""`Scheduler.update_from_output`: the one place a sampled token is appended, the stop rules
applied and a stopped request finished, for every policy, the prefill scheduler (which then
starts the migrations) and the decode scheduler."""

from __future__ import annotations

import pytest

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import DecodeScheduler, PrefillScheduler, SchedulerConfig
from distserve_rt.core.stop_checker import FinishReason, StopChecker
from distserve_rt.sampling_params import SamplingParams
from tests.core.scheduler_helpers import make

EOS = 2


def _request(rid: str, params: SamplingParams, prompt_len: int = 5, generated=()) -> Request:
    r = Request(rid, abs(hash(rid)) % 10_000, list(range(3, 3 + prompt_len)), params, 0.0, 64)
    r.token_ids.extend(generated)
    r.stop_checker = StopChecker(
        params, eos_token_id=EOS, num_prompt_tokens=prompt_len, max_model_len=64,
        detokenizer=None, num_output_tokens=len(generated), apply_stop_strings=False,
    )  # fmt: skip
    return r


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_tokens_are_appended_and_stopped_requests_finished(policy):
    scheduler, bm = make(policy)
    eos = _request("eos", SamplingParams(max_tokens=8))
    stop_id = _request("stop-id", SamplingParams(max_tokens=8, stop_token_ids=[7]))
    early = _request("min-tokens", SamplingParams(max_tokens=8, min_tokens=2))
    runs = _request("runs", SamplingParams(max_tokens=8, logprobs=1))
    runs.logprobs = []
    for r in (eos, stop_id, early, runs):
        scheduler.add_request(r)
    out = scheduler.schedule(1.0)
    rows = out.sampling_requests()
    assert [r.request_id for r in rows] == ["eos", "stop-id", "min-tokens", "runs"]
    logprobs = [{EOS: -0.1}, {7: -0.2}, {EOS: -0.3}, {9: -0.4}]
    update = scheduler.update_from_output(out, [EOS, 7, EOS, 9], logprobs, 2.0)
    assert update.updated == rows
    assert update.finished == [eos, stop_id]
    assert eos.finish_reason is FinishReason.STOP and eos.stop_reason is None
    assert stop_id.finish_reason == "stop" and stop_id.stop_reason == 7
    assert early.status is RequestStatus.RUNNING  # EOS before min_tokens does not stop
    assert runs.output_token_ids == [9] and runs.logprobs == [{9: -0.4}]
    assert runs.token_times == [2.0]
    assert bm.num_used_blocks == sum(len(bm.block_table(r.seq_id)) for r in (early, runs))


def test_a_row_count_that_does_not_match_the_batch_is_refused():
    scheduler, _ = make("continuous_batching")
    scheduler.add_request(_request("a", SamplingParams(max_tokens=4)))
    out = scheduler.schedule(0.0)
    with pytest.raises(ValueError, match="sampled_token_ids has 2 rows; the step has 1"):
        scheduler.update_from_output(out, [5, 6], None, 1.0)


def test_a_request_aborted_while_its_batch_ran_gets_no_token():
    scheduler, _ = make("continuous_batching")
    a, b = _request("a", SamplingParams(max_tokens=4)), _request("b", SamplingParams(max_tokens=4))
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule(0.0)
    scheduler.abort_request("a", 0.5)
    update = scheduler.update_from_output(out, [5, 6], None, 1.0)
    assert update.updated == [b] and a.output_token_ids == [] and b.output_token_ids == [6]


def test_length_counts_tokens_generated_before_a_migration():
    # A decode instance's request already has 3 of its max_tokens=4 (prefill + 2 decoded
    # before a retry): the next token ends it with LENGTH.
    bm = BlockManager(16, 8, 0.0)
    scheduler = DecodeScheduler(SchedulerConfig(max_model_len=64), bm)
    r = _request("m", SamplingParams(max_tokens=4), generated=[11, 12, 13])
    r.num_computed_tokens = r.num_tokens - 1
    scheduler.add_migrated(r)
    assert scheduler.admit_migrations(0.0) == [r]
    scheduler.complete_migration(r)
    out = scheduler.schedule(1.0)
    update = scheduler.update_from_output(out, [14], None, 2.0)
    assert update.finished == [r] and r.finish_reason is FinishReason.LENGTH
    assert bm.num_used_blocks == 0


def test_the_prefill_scheduler_starts_the_migration_of_what_did_not_stop():
    bm = BlockManager(16, 8, 0.0)
    scheduler = PrefillScheduler(SchedulerConfig(max_model_len=64), bm)
    go, stop = _request("go", SamplingParams(max_tokens=4)), _request("stop", SamplingParams())
    scheduler.add_request(go)
    scheduler.add_request(stop)
    out = scheduler.schedule(0.0)
    update = scheduler.update_from_output(out, [9, EOS], None, 1.0)
    assert update.finished == [stop]
    assert list(scheduler.awaiting_migration) == ["go"]
    assert scheduler.awaiting_migration["go"].start_time == 1.0  # the lease starts now
    assert bm.num_used_blocks == len(bm.block_table(go.seq_id)) > 0


def test_instance_stop_checkers_leave_stop_strings_to_the_controller():
    params = SamplingParams(max_tokens=8, stop=["x"])
    with pytest.raises(ValueError, match="needs a detokenizer"):
        StopChecker(params, eos_token_id=EOS, num_prompt_tokens=3, max_model_len=64,
                    detokenizer=None)  # fmt: skip
    checker = StopChecker(
        params, eos_token_id=EOS, num_prompt_tokens=3, max_model_len=64, detokenizer=None,
        num_output_tokens=7, apply_stop_strings=False,
    )  # fmt: skip
    assert checker.append(5).finish_reason is FinishReason.LENGTH  # the 8th token


def test_one_finish_reason_vocabulary_on_the_wire_and_in_outputs():
    import json
    import pickle

    from distserve_rt.engine.disagg import messages as msg

    sent = msg.Tokens("r", [5], 1.0, finish_reason=FinishReason.LENGTH)
    got = pickle.loads(pickle.dumps(sent))  # what the instance pipe does
    assert got.finish_reason is FinishReason.LENGTH and got.finish_reason == "length"
    assert json.dumps({"finish_reason": got.finish_reason}) == '{"finish_reason": "length"}'
    assert {s.finish_reason for s in RequestStatus if s.is_finished} == set(FinishReason)
    for reason in FinishReason:
        assert RequestStatus.finished(reason).finish_reason is reason

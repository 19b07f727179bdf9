"""The engine's step log records each executed step's batch shape and duration."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt import SamplingParams
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.engine.step_log import StepLog, StepShape
from tests.engine.fakes import FakeCausalLM

BLOCK_BYTES = 2 * 2 * 1 * 8 * 16 * 4  # layers * (K, V) * kv heads * block_size 8 * head_dim * fp32


def _engine(policy: str) -> LLMEngine:
    config = EngineConfig(
        model="fake",
        policy=policy,
        block_size=8,
        max_num_batched_tokens=8 if policy == "chunked_prefill" else None,
        max_num_seqs=4,
        kv_cache_memory_bytes=64 * BLOCK_BYTES,
        log_stats_interval_s=0,
    )
    return LLMEngine(config, model=FakeCausalLM())


def _run(engine: LLMEngine, batches: list) -> None:
    """Runs requests arriving over the steps; keeps every batch the executor ran."""
    submit = engine.executor.execute_async

    def spy(batch, block_offset=0):
        batches.append(batch)
        return submit(batch, block_offset)

    engine.executor.execute_async = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", [5 + i] * (3 + 4 * i), params)
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_records_match_the_scheduled_batches(policy):
    engine = _engine(policy)
    log = engine.enable_step_log(1000)
    batches: list = []
    _run(engine, batches)
    records = log.records()
    assert len(records) == len(batches) > 0
    for record, batch in zip(records, batches, strict=True):
        s = record.shape
        assert s.num_prefills == len(batch.prefills)
        assert s.num_prefill_tokens == batch.num_prefill_tokens
        assert s.prefill_attn_work == sum(
            p.num_new_tokens * (p.prefix_len + p.num_new_tokens) for p in batch.prefills
        )
        assert s.num_decodes == len(batch.decodes)
        assert s.sum_decode_seq_lens == int(np.sum(batch.decode_seq_lens))
        assert 0 < record.execute_s <= record.duration_s
    # Each step's start: the next one starts after this one ended (the loop's pause).
    for a, b in zip(records, records[1:], strict=False):
        assert a.start_s + a.duration_s <= b.start_s
    kinds = {r.shape.kind for r in records}
    assert {"prefill", "decode"} <= kinds
    assert ("mixed" in kinds) == (policy == "chunked_prefill")


def test_off_by_default_and_bounded_when_on():
    engine = _engine("continuous_batching")
    assert engine.step_log is None
    _run(engine, [])  # runs without recording anything
    log = engine.enable_step_log(3)
    _run(engine, [])
    assert len(log) == log.capacity == 3  # the last 3 steps only
    record = log.records()[-1]
    assert type(record).from_dict(record.to_dict()) == record
    with pytest.raises(ValueError, match="step log capacity must be a positive int, got 0"):
        StepLog(0)


def test_shape_kind():
    assert StepShape(1, 8, 64, 0, 0).kind == "prefill"
    assert StepShape(0, 0, 0, 2, 40).kind == "decode"
    assert StepShape(1, 8, 64, 2, 40).kind == "mixed"
    assert StepShape(0, 0, 0, 0, 0).kind == "empty"

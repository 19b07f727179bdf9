"""`ModelRunner.prepare_inputs` on hand-made batches: every array the kernels read."""

from __future__ import annotations

import numpy as np
import torch

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler import ScheduledPrefill, SchedulerOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.model_runner import ModelRunner
from distserve_rt.worker.sampling import RequestSampler
from tests.engine.fakes import FakeCausalLM

BS = 8


def make_request(seq_id: int, prompt_len: int, num_output: int = 0) -> Request:
    prompt = [10 + seq_id * 3 + i for i in range(prompt_len)]
    r = Request(f"r{seq_id}", seq_id, prompt, SamplingParams(temperature=0), 0.0, 256)
    for i in range(num_output):
        r.append_token(40 + i, 0.0)
    return r


def make_runner(num_blocks: int = 32) -> ModelRunner:
    pool = torch.zeros(num_blocks, 2, 2, 1, BS, 16)
    return ModelRunner(FakeCausalLM(), pool, RequestSampler(2, 64, pool.device), 64, 8)


def test_mixed_batch_layout():
    bm = BlockManager(32, BS, 0.0)
    # p0: a new prompt of 5; p1: the middle chunk 8..14 of a 20-token prompt (no token);
    # d0, d1: decodes at 13 and 3 cached tokens (after this step's append).
    p0, p1 = make_request(0, 5), make_request(1, 20)
    d0, d1 = make_request(2, 10, num_output=3), make_request(3, 2, num_output=1)
    for r in (p0, p1):
        bm.allocate(r.seq_id, r.num_tokens)
    for r in (d0, d1):
        bm.allocate(r.seq_id, r.num_tokens - 1)
    decode_slots = bm.append_slots_batch([d0.seq_id, d1.seq_id]).slot_mapping
    prefills = [ScheduledPrefill(p0, 5, 0, True), ScheduledPrefill(p1, 7, 8, False)]
    out = SchedulerOutput(prefills=prefills, decodes=[d0, d1], num_prefill_tokens=12)
    out.slot_mapping = np.concatenate(
        [bm.slot_mapping(p0.seq_id, 0, 5), bm.slot_mapping(p1.seq_id, 8, 15), decode_slots]
    )
    out.prefill_block_tables = bm.block_tables([p0.seq_id, p1.seq_id])
    out.decode_block_tables = bm.block_tables([d0.seq_id, d1.seq_id])
    out.decode_seq_lens = bm.seq_lens([d0.seq_id, d1.seq_id])

    mi = make_runner().prepare_inputs(out)
    md = mi.metadata
    assert mi.input_ids.tolist() == [*p0.token_ids, *p1.token_ids[8:15], 42, 40]
    assert mi.positions.tolist() == [0, 1, 2, 3, 4, *range(8, 15), 12, 2]
    assert md.num_prefill_tokens == 12 and md.num_decode_tokens == 2
    assert md.prefill_cu_seqlens.tolist() == [0, 5, 12] and md.prefill_max_seqlen == 7
    assert md.prefill_prefix_lens.tolist() == [0, 8]
    # Rows padded with block 0 to the widest table (p1: 3 blocks).
    assert md.prefill_block_table.shape == (2, 3)
    assert md.prefill_block_table[0].tolist() == [*bm.block_table(p0.seq_id), 0, 0]
    assert md.slot_mapping.tolist() == out.slot_mapping.tolist()
    assert md.slot_mapping.dtype == torch.int64 and md.prefill_cu_seqlens.dtype == torch.int32
    assert md.decode_seq_lens.tolist() == [13, 3] and md.decode_max_seq_len == 13
    assert md.decode_block_table.shape == (2, 2)
    assert md.decode_block_table[1].tolist() == [*bm.block_table(d1.seq_id), 0]
    # Logits: the last row of p0 (p1's chunk is not its last), then each decode row.
    assert mi.logits_rows.tolist() == [4, 12, 13]
    assert mi.sampling_requests == [p0, d0, d1]


def test_prefill_only_without_prefix_has_no_block_table():
    bm = BlockManager(8, BS, 0.0)
    r = make_request(0, 3)
    bm.allocate(r.seq_id, 3)
    out = SchedulerOutput(prefills=[ScheduledPrefill(r, 3, 0, True)], num_prefill_tokens=3)
    out.slot_mapping = bm.slot_mapping(r.seq_id)
    md = make_runner().prepare_inputs(out).metadata
    assert md.prefill_block_table is None and md.prefill_prefix_lens is None
    assert md.decode_block_table is None and md.num_decode_tokens == 0


def test_buffers_are_reused_between_steps():
    runner = make_runner()
    bm = BlockManager(8, BS, 0.0)
    a, b = make_request(0, 4), make_request(1, 2)
    for r in (a, b):
        bm.allocate(r.seq_id, r.num_tokens)
    first = SchedulerOutput(prefills=[ScheduledPrefill(a, 4, 0, True)], num_prefill_tokens=4)
    first.slot_mapping = bm.slot_mapping(a.seq_id)
    second = SchedulerOutput(prefills=[ScheduledPrefill(b, 2, 0, True)], num_prefill_tokens=2)
    second.slot_mapping = bm.slot_mapping(b.seq_id)
    runner.prepare_inputs(first)
    mi = runner.prepare_inputs(second)
    assert mi.input_ids.tolist() == b.token_ids and mi.positions.tolist() == [0, 1]
    assert mi.logits_rows.tolist() == [1]

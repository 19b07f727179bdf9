"""`StepBatch`: the arrays a remote worker rebuilds its inputs from, and the virtual
engine's block offset."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.worker.step_batch import StepBatch


def _batch() -> StepBatch:
    return StepBatch(
        input_ids=np.array([5, 6, 7, 9], dtype=np.int64),
        prefill_num_new_tokens=np.array([3], dtype=np.int64),
        prefill_prefix_lens=np.array([2], dtype=np.int64),
        prefill_produces_token=np.array([True]),
        decode_seq_lens=np.array([4], dtype=np.int32),
        decode_block_tables=np.array([[1, 0]], dtype=np.int32),
        slot_mapping=np.array([18, 19, 20, -1], dtype=np.int64),
        prefill_block_tables=np.array([[2, 3]], dtype=np.int32),
    )


def test_shift_blocks_moves_every_block_id_and_keeps_padding():
    batch = _batch()
    original_slots = batch.slot_mapping
    batch.shift_blocks(block_offset=10, block_size=8)
    assert batch.slot_mapping.tolist() == [98, 99, 100, -1]  # padding stays negative
    assert batch.decode_block_tables.tolist() == [[11, 10]]
    assert batch.prefill_block_tables.tolist() == [[12, 13]]
    assert batch.decode_block_tables.dtype == np.int32
    assert original_slots.tolist() == [18, 19, 20, -1]  # the scheduler's arrays are untouched
    assert (batch.num_tokens, batch.num_prefill_tokens, batch.num_decodes) == (4, 3, 1)
    with pytest.raises(ValueError, match="block_offset must be >= 0, got -1"):
        batch.shift_blocks(-1, 8)

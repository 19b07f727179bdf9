"""Block manager bookkeeping of one decode step at batch 256 (BENCHMARKS.md: the scheduler's
whole per-step CPU budget is 0.2 ms, so this part must be a small fraction of it)."""

from __future__ import annotations

import numpy as np

from distserve_rt.core.block_manager import BlockManager

BATCH = 256
PROMPT_LEN = 128
ROUNDS = 2000  # each round appends one token per request; the pool is sized for all of them


def _manager() -> tuple[BlockManager, np.ndarray]:
    block_size = 16
    blocks_per_request = (PROMPT_LEN + ROUNDS + 1) // block_size + 1
    manager = BlockManager(num_blocks=BATCH * blocks_per_request + 16, block_size=block_size)
    request_ids = np.arange(BATCH, dtype=np.int64)
    for request_id in request_ids:
        manager.allocate(int(request_id), PROMPT_LEN)
    return manager, request_ids


def test_decode_step_bookkeeping(benchmark):
    """append one slot per request + the block tables and seq_lens the model runner needs."""
    manager, request_ids = _manager()
    benchmark.extra_info.update(batch=BATCH, prompt_len=PROMPT_LEN)

    def step():
        result = manager.append_slots_batch(request_ids)
        assert result is not None
        return manager.block_tables(request_ids), manager.seq_lens(request_ids)

    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    manager.check_invariants()

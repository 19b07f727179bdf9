"""A prefill instance runs a prompt longer than its token budget L_m in a batch of its own:
its runner's buffers must hold it (they were sized to L_m, and the step failed)."""

from __future__ import annotations

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.core import make_engine_core
from tests.engine.disagg_helpers import engine_config, run


def test_prompt_longer_than_the_prefill_budget():
    prompt = [3 + (7 * j) % 500 for j in range(100)]
    colocated = make_engine_core(engine_config(max_num_batched_tokens=64, max_num_seqs=8))
    expected = run(colocated, [prompt], max_tokens=4)["0"]
    colocated.shutdown()
    # L_m = 64 < 100 prompt tokens
    config = engine_config(max_num_batched_tokens=64, max_num_seqs=8)
    controller = make_engine_core(config, "disaggregated", DisaggConfig(launcher="thread"))
    try:
        out = run(controller, [prompt], max_tokens=4)["0"]
    finally:
        controller.shutdown()
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids

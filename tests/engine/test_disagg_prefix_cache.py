"""Prefix caching on the prefill instance of a disaggregated deployment: a second turn whose
prompt repeats the first is prefilled from the cache, the KV the decode instance pulls (cached
blocks included) gives the same greedy and seeded tokens as a colocated engine without the
cache, and the prefill instance reports its hits. Instances run on threads (real shm)."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig
from distserve_rt.engine.core import make_engine_core
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import drain, engine_config, greedy, settle

SYSTEM = [3 + (11 * j) % 400 for j in range(45)]
PROMPTS = [SYSTEM + [7, 8, 9], SYSTEM + [17], SYSTEM[:32]]
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=6, ignore_eos=True)


def _two_rounds(engine, params: SamplingParams) -> list[list[int]]:
    tokens = []
    for round_index in range(2):  # round 2 starts once round 1's KV is released: it hits
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"{round_index}-{i}", prompt, params)
        outs = drain(engine)
        tokens += [outs[f"{round_index}-{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]
    return tokens


@pytest.mark.parametrize("params", [greedy(6), SEEDED], ids=["greedy", "seeded"])
def test_prefill_instance_reuses_its_cache_with_the_same_tokens(params):
    colocated = make_engine_core(engine_config(enable_prefix_caching=False))
    expected = _two_rounds(colocated, params)
    controller = make_engine_core(
        engine_config(), "disaggregated", DisaggConfig(launcher="thread", stats_interval_s=0.01)
    )
    try:
        assert _two_rounds(controller, params) == expected
        settle(controller, lambda: controller.stats().instances[0].prefix_cache_hits > 0)
        prefill, decode = controller.stats().instances
        assert prefill.role == "prefill" and prefill.prefix_cache_hits >= 3 * 32
        # Round 2's migrations found round 1's blocks in the decode instance's cache too.
        assert decode.prefix_cache_hits > 0 and decode.num_blocks_reused > 0
    finally:
        controller.shutdown()
    assert expected[:3] == expected[3:]  # same prompts and seeds: the rounds agree

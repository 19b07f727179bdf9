"""The scheduler-driven simulator's prefix model: multi-turn conversations replayed closed
loop with the runtime's own prefix cache on the simulated pool. Its hit count equals the
colocated engine's on the same conversations; hits shorten prefills; eviction under a
small pool lowers them; a hand-counted two-turn case."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from distserve_rt import SamplingParams
from distserve_rt.config import DisaggConfig
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator import (
    DisaggSpec,
    KVTransferSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.workloads.multi_turn import (
    Conversation,
    MultiTurnWorkload,
    Turn,
    next_prompt,
)
from tests.engine.fakes import FakeCausalLM

BLOCK = 8
BLOCK_BYTES = 2 * 2 * 1 * BLOCK * 16 * 4  # FakeCausalLM: layers * (K, V) * kv heads * 8 * hd * fp32


@dataclass(frozen=True)
class AffineLatency(LatencyModel):
    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return 0.01 + 1e-3 * num_tokens

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return 0.005, 0.0


def workload(seed: int = 0) -> MultiTurnWorkload:
    # FakeCausalLM: vocab 64, 256 positions
    return MultiTurnWorkload.generate(
        6, rate=5.0, scale=0.03, think_s=0.2, max_seq_len=250, vocab_size=64, seed=seed
    )


def simulate(w, policy="continuous_batching", num_blocks=200, caching=True, budget=512):
    spec = SimInstanceSpec(
        AffineLatency(), num_blocks * BLOCK, max_batch_tokens=budget, max_num_seqs=8
    )
    sim = SchedulerDrivenColocated(spec, policy, block_size=BLOCK, max_model_len=256)
    return sim.run_conversations(w, prefix_caching=caching)


def replay_on_engine(w, policy, budget) -> tuple[int, int]:
    """The conversations on the colocated engine, closed loop (the next turn is added when
    the previous one's answer came back), all first turns at once."""
    config = EngineConfig(
        model="fake", policy=policy, block_size=BLOCK, max_num_batched_tokens=budget,
        max_num_seqs=8,
        kv_cache_memory_bytes=200 * BLOCK_BYTES, log_stats_interval_s=0,
        enable_prefix_caching=True,
    )  # fmt: skip
    engine = LLMEngine(config, model=FakeCausalLM())
    state = {}  # request id -> (conversation, turn, prompt)

    def add(c: int, k: int, prompt: list[int]) -> None:
        turn = w.conversations[c].turns[k]
        params = SamplingParams(temperature=0, max_tokens=turn.output_len, ignore_eos=True)
        engine.add_request(f"{c}-{k}", prompt, params)
        state[f"{c}-{k}"] = (c, k, prompt)

    for c, conv in enumerate(w.conversations):
        add(c, 0, next_prompt([], [], conv.turns[0]))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c, k, prompt = state[out.request_id]
                turns = w.conversations[c].turns
                if k + 1 < len(turns):
                    add(c, k + 1, next_prompt(prompt, out.outputs[0].token_ids, turns[k + 1]))
    stats = engine.block_manager.stats()
    engine.shutdown()
    return stats.prefix_cache_queries, stats.prefix_cache_hits


@pytest.mark.parametrize(
    ("policy", "budget"), [("continuous_batching", 512), ("chunked_prefill", 24)]
)
def test_hits_equal_the_runtime(policy, budget):
    w = workload()
    sim = simulate(w, policy, budget=budget)
    queries, hits = replay_on_engine(w, policy, budget)
    assert sim.prefix_cache_hits > 0
    assert (sim.prefix_cache_queries, sim.prefix_cache_hits) == (queries, hits)


def test_hand_counted_two_turns():
    turns = (Turn(np.arange(1, 41), 10, 0.5), Turn(np.arange(41, 61), 4, 0.0))
    w = MultiTurnWorkload("two", (Conversation(0, 0.0, turns),))
    sim = simulate(w)
    # Turn 1: 40 prompt tokens; its KV covers 40 + 9 decoded tokens (the last one is never
    # fed back), so blocks 0-5 (48 tokens) are full and cached. Turn 2: 40 + 10 + 20 = 70.
    assert list(sim.prompt_lens) == [40, 70]
    assert (sim.prefix_cache_queries, sim.prefix_cache_hits) == (110, 48)
    r = sim.result
    assert r.arrival[1] == pytest.approx(r.finish[0] + 0.5)  # closed loop: answer + think


def test_hits_shorten_prefill_and_eviction_lowers_hits():
    w = workload(seed=1)
    on, off = simulate(w), simulate(w, caching=False)
    assert off.prefix_cache_hits == 0 and on.prefix_cache_hits > 0
    assert on.result.ttft.mean() < off.result.ttft.mean()
    assert sorted(on.prompt_lens) == sorted(off.prompt_lens)  # closed loop: order differs
    # A pool of 40 blocks holds the running turns but not every conversation's history.
    small = simulate(w, num_blocks=40)
    assert 0 < small.prefix_cache_hits < on.prefix_cache_hits


def test_disaggregated_without_decode_caching_caches_on_prefill_instances_only():
    # DisaggConfig.decode_prefix_caching off (tests/planner/test_sim_decode_reuse.py: on).
    turns = (Turn(np.arange(1, 41), 10, 0.5), Turn(np.arange(41, 61), 4, 0.0))
    w = MultiTurnWorkload("two", (Conversation(0, 0.0, turns),))
    inst = SimInstanceSpec(AffineLatency(), 200 * BLOCK, max_batch_tokens=512)
    spec = DisaggSpec(inst, inst, 1, 1, KVTransferSpec(1e-3, 0.0))
    sim = SchedulerDrivenDisaggregated(spec, block_size=BLOCK, max_model_len=256)
    dc = DisaggConfig(decode_prefix_caching=False)
    got = sim.run_conversations(w, disagg_config=dc)
    # The prefill instance never holds the answer: turn 2 hits turn 1's 40 prompt tokens
    # (5 full blocks), not the 48 a colocated pool holds.
    assert (got.prefix_cache_queries, got.prefix_cache_hits) == (110, 40)
    r = got.result
    assert r.arrival[1] == pytest.approx(r.finish[0] + 0.5)
    # The whole prompt migrates (no decode-side cache to pull a delta into): 70 tokens.
    assert r.transfer_end[1] - r.transfer_start[1] == pytest.approx(70e-3)
    assert all(bm.num_free_blocks == bm.num_blocks for bm in sim.block_managers[1:])
    w2 = workload(seed=2)
    on = sim.run_conversations(w2, disagg_config=dc)
    off = sim.run_conversations(w2, prefix_caching=False)
    assert on.prefix_cache_hits > 0 == off.prefix_cache_hits
    assert on.result.ttft.mean() < off.result.ttft.mean()


def test_refuses_a_single_turn_workload():
    from distserve_rt.workloads import Workload

    with pytest.raises(ValueError, match="workload must be a MultiTurnWorkload .* got Workload"):
        simulate(Workload.from_dataset("chat"))

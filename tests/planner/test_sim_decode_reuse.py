"""The disaggregated simulator models the runtime's decode-side reuse with the runtime's own
code: on multi-turn conversations its prefill-side hits, decode-side reused and pulled
blocks and local-prefill count equal the runtime's counters (instances on threads, real shm
transfers) for the same conversations, on 1P1D and 1P2D, with conditional disaggregation
off and on; a hand-counted two-turn case pins the delta pull and its transfer time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.core import make_engine_core
from distserve_rt.planner.simulator import (
    DisaggSpec,
    KVTransferSpec,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.workloads.multi_turn import Conversation, MultiTurnWorkload, Turn, next_prompt
from tests.engine.disagg_helpers import engine_config
from tests.planner.test_sim_prefix_model import BLOCK, AffineLatency

MAX_LEN = 256  # engine_config's max_model_len


def conversations(seed: int) -> MultiTurnWorkload:
    return MultiTurnWorkload.generate(
        4, rate=5.0, scale=0.03, think_s=0.2, max_seq_len=250, vocab_size=64, seed=seed
    )


def sim_counters(w, num_decode: int, dc: DisaggConfig, num_blocks: int, sc) -> tuple:
    inst = SimInstanceSpec(
        AffineLatency(), num_blocks * BLOCK, max_batch_tokens=sc.max_num_batched_tokens,
        max_num_seqs=sc.max_num_seqs,
    )  # fmt: skip
    spec = DisaggSpec(inst, inst, 1, num_decode, KVTransferSpec(1e-3, 1e-5))
    sim = SchedulerDrivenDisaggregated(spec, block_size=BLOCK, max_model_len=MAX_LEN)
    got = sim.run_conversations(w, disagg_config=dc)
    return (
        got.instance_prefix_cache_queries[0],
        got.instance_prefix_cache_hits[0],
        got.num_blocks_reused,
        got.num_blocks_pulled,
        got.num_local_prefills,
    )


def runtime_counters(controller) -> tuple:
    stats = controller.stats().instances
    prefill = [s for s in stats if s.role == "prefill"]
    decode = [s for s in stats if s.role == "decode"]
    return (
        sum(s.prefix_cache_queries for s in prefill),
        sum(s.prefix_cache_hits for s in prefill),
        sum(s.num_blocks_reused for s in decode),
        sum(s.num_blocks_pulled for s in decode),
        sum(s.num_prefills for s in decode),
    )


def replay(controller, w: MultiTurnWorkload) -> None:
    """Closed loop, no think time (the counters do not depend on timing): a turn is added
    when the previous one's answer came back."""
    state = {}

    def add(c: int, k: int, prompt: list[int]) -> None:
        turn = w.conversations[c].turns[k]
        params = SamplingParams(temperature=0, max_tokens=turn.output_len, ignore_eos=True)
        controller.add_request(f"{c}-{k}", prompt, params)
        state[f"{c}-{k}"] = (c, k, prompt)

    for c, conv in enumerate(w.conversations):
        add(c, 0, next_prompt([], [], conv.turns[0]))
    deadline = time.monotonic() + 120
    while controller.has_unfinished_requests():
        assert time.monotonic() < deadline, "conversations not finished after 120 s"
        for out in controller.step(0.01):
            if out.finished:
                assert out.outputs[0].finish_reason == "length", out
                c, k, prompt = state.pop(out.request_id)
                turns = w.conversations[c].turns
                if k + 1 < len(turns):
                    add(c, k + 1, next_prompt(prompt, out.outputs[0].token_ids, turns[k + 1]))


@pytest.mark.parametrize(
    ("num_decode", "disagg"),
    [
        (1, {}),
        (2, {}),
        (2, {"local_prefill_max_tokens": 40}),
    ],
    ids=["1P1D", "1P2D", "1P2D-local-prefill"],
)
def test_counters_equal_the_runtime(num_decode, disagg):
    # Timing-independent: a conversation's turns run one after another, nothing is evicted,
    # and with 4 conversations no decode instance can be more than 4 requests above another
    # (the default max_decode_load_imbalance), so each follow-up goes to its prefix's
    # instance whatever the interleaving; which instance a first turn gets may differ, the
    # summed counters may not.
    w = conversations(seed=3)
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=num_decode))
    dc = DisaggConfig(launcher="thread", stats_interval_s=0.01, **disagg)
    controller = make_engine_core(engine_config(), placement, dc)
    try:
        num_blocks = controller._num_blocks[controller.decodes()[0].name]
        want = sim_counters(w, num_decode, dc, num_blocks, controller.scheduler_config)
        replay(controller, w)
        # The counters come with the instances' periodic reports: wait for the last ones.
        deadline = time.monotonic() + 10
        while runtime_counters(controller) != want and time.monotonic() < deadline:
            controller.step(0.01)
        got = runtime_counters(controller)
    finally:
        controller.shutdown()
    # (prefill queries, prefill hits, decode blocks reused, decode blocks pulled, local)
    assert got == want
    assert want[1] > 0 and want[2] > 0 and want[3] > 0
    assert (want[4] > 0) is bool(disagg)


def test_hand_counted_delta_pull_and_local_prefill():
    turns = (Turn(np.arange(1, 41), 10, 0.5), Turn(np.arange(41, 61), 4, 0.0))
    w = MultiTurnWorkload("two", (Conversation(0, 0.0, turns),))
    inst = SimInstanceSpec(AffineLatency(), 200 * BLOCK, max_batch_tokens=512)
    spec = DisaggSpec(inst, inst, 1, 1, KVTransferSpec(1e-3, 0.0))
    sim = SchedulerDrivenDisaggregated(spec, block_size=BLOCK, max_model_len=MAX_LEN)
    got = sim.run_conversations(w)
    # Turn 1 pulls its 40 prompt tokens (5 blocks) and decodes 9 more: 6 full blocks cached
    # on the decode instance. Turn 2 (70 tokens) reuses those 6 and pulls 3 blocks, 22 tokens.
    assert (got.num_blocks_reused, got.num_blocks_pulled, got.num_local_prefills) == (6, 8, 0)
    assert got.instance_prefix_cache_hits == (40, 48)
    r = got.result
    assert r.transfer_end - r.transfer_start == pytest.approx([40e-3, 22e-3])
    # Conditional disaggregation: turn 2 lacks 22 tokens on the decode instance (<= 30), so
    # it is prefilled there, on the decode instance's clock, and nothing moves for it.
    local = sim.run_conversations(w, disagg_config=DisaggConfig(local_prefill_max_tokens=30))
    assert (local.num_local_prefills, local.num_blocks_pulled) == (1, 5)
    assert local.instance_prefix_cache_queries == (40, 40 + 70)
    assert local.instance_prefix_cache_hits == (0, 48)
    lr = local.result
    assert lr.transfer_end[1] == lr.transfer_start[1] == lr.prefill_end[1]
    assert lr.ttft[1] < r.ttft[1]
    # The decode instance's cache off: the whole prompt migrates (the earlier model).
    off = sim.run_conversations(w, disagg_config=DisaggConfig(decode_prefix_caching=False))
    assert (off.num_blocks_reused, off.num_blocks_pulled) == (0, 5 + 9)
    assert off.instance_prefix_cache_hits == (40, 0)


def test_refuses_a_bad_disagg_config():
    inst = SimInstanceSpec(AffineLatency(), 200 * BLOCK, max_batch_tokens=512)
    sim = SchedulerDrivenDisaggregated(DisaggSpec(inst, inst), block_size=BLOCK)
    with pytest.raises(ValueError, match="disagg_config must be a DisaggConfig or None, got dict"):
        sim.run_conversations(conversations(0), disagg_config={})


def test_a_long_prefill_queue_sends_a_request_to_a_decode_instance():
    # Two first turns at t=0: the first finds the prefill queue empty, the second finds the
    # first's 40 tokens queued (>= 1) and is prefilled on the decode instance.
    convs = tuple(
        Conversation(c, 0.0, (Turn(np.arange(1, 41) + 100 * c, 4, 0.0),)) for c in range(2)
    )
    w = MultiTurnWorkload("burst", convs)
    inst = SimInstanceSpec(AffineLatency(), 200 * BLOCK, max_batch_tokens=512)
    spec = DisaggSpec(inst, inst, 1, 1, KVTransferSpec(1e-3, 0.0))
    sim = SchedulerDrivenDisaggregated(spec, block_size=BLOCK, max_model_len=MAX_LEN)
    got = sim.run_conversations(w, disagg_config=DisaggConfig(local_prefill_min_queue_tokens=1))
    assert got.num_local_prefills == 1
    assert got.instance_prefix_cache_queries == (40, 40 + 40)  # a migration and a prefill
    r = got.result
    assert r.transfer_end[0] > r.prefill_end[0]  # migrated
    assert r.transfer_start[1] == r.transfer_end[1] == r.prefill_end[1]  # local


def test_a_follow_up_goes_to_the_decode_instance_holding_its_prefix():
    # Conversation 1's first turn decodes on decode-1 (decode-0 holds conversation 0's
    # long answer); conversation 2 lands there too and is still decoding when
    # conversation 1's follow-up comes, while decode-0 is idle by then: least-loaded would
    # pick decode-0, the cache-aware rule picks decode-1 (one more request, within
    # max_decode_load_imbalance) and reuses its 5 blocks; with the cap at 0 it may not.
    convs = (
        Conversation(0, 0.0, (Turn(np.arange(1, 41), 150, 0.0),)),
        Conversation(
            1, 0.0, (Turn(np.arange(101, 141), 3, 0.2), Turn(np.arange(141, 161), 2, 0.0))
        ),
        Conversation(2, 0.05, (Turn(np.arange(201, 301), 150, 0.0),)),
    )
    w = MultiTurnWorkload("routing", convs)
    inst = SimInstanceSpec(AffineLatency(), 200 * BLOCK, max_batch_tokens=512)
    spec = DisaggSpec(inst, inst, 1, 2, KVTransferSpec(1e-3, 0.0))
    sim = SchedulerDrivenDisaggregated(spec, block_size=BLOCK, max_model_len=MAX_LEN)
    got = sim.run_conversations(w)
    assert got.num_blocks_reused == 5
    assert got.instance_prefix_cache_hits[1:] == (0, 5 * BLOCK)  # on decode-1
    capped = sim.run_conversations(w, disagg_config=DisaggConfig(max_decode_load_imbalance=0))
    assert capped.num_blocks_reused == 0
    assert capped.instance_prefix_cache_hits[1:] == (0, 0)

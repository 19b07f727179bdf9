"""Decode-side reuse and conditional disaggregation, end to end (instances on threads, real
shm transfers): multi-turn conversations give the same greedy and seeded tokens as a
colocated engine without any cache, with the decode instances' cache on or off, on 1P1D and
1P2D; a follow-up turn lands on the decode instance that decoded the previous one and pulls
only the blocks it lacks (counted); with conditional disaggregation on, a short follow-up is
prefilled on its decode instance and nothing is transferred for it."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.core import make_engine_core
from distserve_rt.metrics.prometheus import EngineStatsCollector
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import drain, engine_config, greedy, settle

BLOCK = 8  # engine_config's block size
# Two conversations with different first blocks (so their caches differ), 40-token prompts.
FIRST_TURNS = [[3 + (11 * j + 7 * c) % 400 for j in range(40)] for c in range(2)]
FOLLOW_UP = [[450 + 20 * c + j for j in range(10)] for c in range(2)]  # each turn adds 10
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=8, ignore_eos=True)


def _conversations(
    engine, params: SamplingParams, num_turns: int = 2, after_turn=None
) -> list[list[int]]:
    """Turn by turn: each turn's prompt is the previous prompt, its output and a follow-up.
    Returns every turn's output tokens; `after_turn(turn)` runs once each turn is done."""
    prompts = [list(p) for p in FIRST_TURNS]
    tokens = []
    for turn in range(num_turns):
        for c, prompt in enumerate(prompts):
            engine.add_request(f"{turn}-{c}", prompt, params)
        outs = drain(engine)
        for c in range(len(prompts)):
            out = outs[f"{turn}-{c}"].outputs[0].token_ids
            tokens.append(out)
            prompts[c] = prompts[c] + out + FOLLOW_UP[c]
        if after_turn is not None:
            after_turn(turn)
    return tokens


@pytest.fixture(scope="module")
def expected():
    colocated = make_engine_core(engine_config(enable_prefix_caching=False))
    return {
        "greedy": _conversations(colocated, greedy(8)),
        "seeded": _conversations(colocated, SEEDED),
    }


def _controller(num_decode: int, **disagg):
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=num_decode))
    dc = DisaggConfig(launcher="thread", stats_interval_s=0.01, **disagg)
    return make_engine_core(engine_config(), placement, dc)


def _decode_stats(controller):
    return [s for s in controller.stats().instances if s.role == "decode"]


@pytest.mark.parametrize("num_decode", [1, 2], ids=["1P1D", "1P2D"])
@pytest.mark.parametrize("decode_caching", [True, False], ids=["decode-cache", "no-decode-cache"])
def test_same_tokens_with_decode_caching_on_and_off(expected, num_decode, decode_caching):
    controller = _controller(num_decode, decode_prefix_caching=decode_caching)
    try:
        assert _conversations(controller, greedy(8)) == expected["greedy"]
        assert _conversations(controller, SEEDED) == expected["seeded"]
        settle(controller, lambda: controller.stats().transfers.num_transfers == 8)
        reused = sum(s.num_blocks_reused for s in _decode_stats(controller))
        assert (reused > 0) is decode_caching
    finally:
        controller.shutdown()


def _pulled_reused(controller) -> list[tuple[int, int]]:
    return [(s.num_blocks_pulled, s.num_blocks_reused) for s in _decode_stats(controller)]


def test_a_second_turn_goes_where_the_first_was_decoded_and_pulls_only_the_delta(expected):
    controller = _controller(2)
    seen = []

    def after_turn(turn: int) -> None:
        settle(controller, lambda: controller.stats().transfers.num_transfers == 2 * (turn + 1))
        seen.append(_pulled_reused(controller))

    try:
        assert _conversations(controller, greedy(8), after_turn=after_turn) == expected["greedy"]
        # Turn 1: 40 prompt tokens each, KV of 40 tokens = 5 blocks pulled, nothing reused;
        # least loaded routing put one conversation on each decode instance.
        assert seen[0] == [(5, 0), (5, 0)]
        # Turn 2: 40 + 8 output + 10 follow-up = 58 tokens of KV = 8 blocks. The decode
        # instance that decoded turn 1 holds its 5 prompt blocks (positions 40-47 never
        # filled a block: the last output token's KV is never computed): 3 are pulled.
        assert seen[1] == [(5 + 3, 5), (5 + 3, 5)]
        assert sum(s.prefix_cache_hits for s in _decode_stats(controller)) == 2 * 5 * BLOCK
    finally:
        controller.shutdown()


def test_without_decode_caching_every_turn_pulls_everything():
    controller = _controller(2, decode_prefix_caching=False)
    try:
        _conversations(controller, greedy(8))
        settle(controller, lambda: controller.stats().transfers.num_transfers == 4)
        assert sorted(_pulled_reused(controller)) == [(5 + 8, 0), (5 + 8, 0)]
    finally:
        controller.shutdown()


@pytest.mark.parametrize("params", ["greedy", "seeded"])
def test_conditional_disaggregation_prefills_a_short_follow_up_on_its_decode_instance(
    expected, params
):
    # Turn 1 lacks 40 tokens everywhere: disaggregated. Turn 2 lacks 58 - 40 = 18 <= 24 on
    # the decode instance that decoded turn 1: prefilled there, nothing transferred.
    controller = _controller(2, local_prefill_max_tokens=24)
    sampling = greedy(8) if params == "greedy" else SEEDED
    try:
        assert _conversations(controller, sampling) == expected[params]
        settle(controller, lambda: sum(s.num_prefills for s in _decode_stats(controller)) == 2)
        stats = controller.stats()
        prefill = [s for s in stats.instances if s.role == "prefill"]
        assert [s.num_prefills for s in prefill] == [2]
        assert [s.num_prefills for s in _decode_stats(controller)] == [1, 1]
        assert stats.transfers.num_transfers == 2  # turn 1 only
        # The local prefill reused the decode instance's cached turn-1 blocks.
        assert all(s.prefix_cache_hits >= 5 * BLOCK for s in _decode_stats(controller))
        metrics = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for m in EngineStatsCollector(controller.stats).collect()
            for x in m.samples
        }
        local = (
            "distserve_instance_prefills_total",
            (("instance", "decode-0"), ("role", "decode"), ("where", "local")),
        )
        assert metrics[local] == 1
        pulled = (
            "distserve_instance_kv_blocks_transferred_total",
            (("instance", "decode-1"), ("role", "decode")),
        )
        assert metrics[pulled] == 5
    finally:
        controller.shutdown()


def test_a_long_prefill_queue_sends_requests_to_decode_instances():
    """The first request finds the prefill queue empty and goes there; the next ones see its
    40 queued tokens (>= 1) and are prefilled on decode instances."""
    controller = _controller(2, local_prefill_min_queue_tokens=1)
    try:
        for i in range(3):
            controller.add_request(str(i), FIRST_TURNS[0], greedy(4))
        outs = drain(controller)
        assert len({tuple(o.outputs[0].token_ids) for o in outs.values()}) == 1
        # Both counters come with the decode instances' periodic reports, each on its own.
        settle(
            controller,
            lambda: (
                sum(s.num_prefills for s in _decode_stats(controller)) == 2
                and controller.stats().transfers.num_transfers >= 1
            ),
        )
        assert controller.stats().transfers.num_transfers == 1
    finally:
        controller.shutdown()


def test_a_follow_up_alone_is_routed_to_its_cache_not_to_the_first_idle_instance():
    """Conversation 1 was decoded on decode-1; both instances are idle when its follow-up
    arrives, so least-loaded routing would pick decode-0 (the first): the cache picks
    decode-1, which pulls only the delta."""
    controller = _controller(2)
    try:
        first = _conversations(controller, greedy(8), num_turns=1)
        settle(controller, lambda: controller.stats().transfers.num_transfers == 2)
        assert _pulled_reused(controller) == [(5, 0), (5, 0)]
        controller.add_request("follow-up", FIRST_TURNS[1] + first[1] + FOLLOW_UP[1], greedy(8))
        drain(controller)
        settle(controller, lambda: controller.stats().transfers.num_transfers == 3)
        assert _pulled_reused(controller) == [(5, 0), (5 + 3, 5)]
    finally:
        controller.shutdown()


def test_a_locally_prefilled_request_aborts_and_is_retried_on_a_prefill_instance(expected):
    """Abort reaches the decode instance that prefills it; when that decode instance dies,
    the request is re-prefilled on the prefill instance (a retry never goes local) and
    migrates to the live decode instance."""
    from distserve_rt.engine.disagg import recovery

    controller = _controller(2, local_prefill_max_tokens=4096, retry_on_instance_failure=True)
    try:
        controller.add_request("a", FIRST_TURNS[0], greedy(200))
        controller.add_request("b", FIRST_TURNS[1], greedy(8))
        assert controller.requests["a"].decode_index is not None  # sent to a decode instance
        assert controller.abort_request("a")
        dead = controller.requests["b"].decode_index
        recovery.on_instance_death(controller, controller.decode(dead), "declared dead by the test")
        outs = drain(controller)
        assert outs["a"].outputs[0].finish_reason == "abort"
        assert outs["b"].outputs[0].finish_reason == "length"
        assert outs["b"].outputs[0].token_ids == expected["greedy"][1]  # turn 1 of "b"
        prefill = [s for s in controller.stats().instances if s.role == "prefill"][0]
        settle(controller, lambda: controller.stats().transfers.num_transfers == 1)
        assert controller.stats().instances[0].num_prefills == 1 and prefill.alive
    finally:
        controller.shutdown()

"""The disaggregated runtime in one process (instances on threads, real shm transfers):
greedy outputs equal colocated ones, KV arrives bit-exactly, leases, back-pressure, abort in
every stage, latency breakdown and stats. Spawned processes: tests/e2e/test_disagg_e2e.py."""

from __future__ import annotations

import math

import pytest

from distserve_rt.config import DisaggConfig, EngineConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from tests.engine.disagg_helpers import (
    PROMPTS,
    drain,
    engine_config,
    greedy,
    kv_idle,
    run,
    settle,
    token_ids,
)

MAX_TOKENS = 8


def _colocated(config: EngineConfig) -> list[list[int]]:
    engine = LLMEngine(config)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return token_ids(outputs)


def _controller(placement: Placement, config: EngineConfig | None = None, **disagg):
    disagg.setdefault("launcher", "thread")
    return Controller(config or engine_config(), placement, DisaggConfig(**disagg))


@pytest.fixture(scope="module")
def colocated_tokens():
    return _colocated(engine_config())


@pytest.mark.parametrize(("num_prefill", "num_decode"), [(1, 1), (2, 1), (1, 2)])
def test_greedy_equals_colocated_and_kv_arrives_bit_exactly(
    colocated_tokens, num_prefill, num_decode
):
    placement = Placement.disaggregated(PhaseConfig(num_instances=num_prefill),
                                        PhaseConfig(num_instances=num_decode))  # fmt: skip
    with _controller(placement, debug_verify_kv=True) as c:
        # Start-up returns only once every decode instance mapped every prefill pool, so the
        # first requests' transfer queue time does not include the mapping.
        assert c._peers_opened == {h.name for h in c.decodes()}
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert token_ids(outputs) == colocated_tokens
        settle(c, lambda: c.num_kv_verified() == len(PROMPTS))  # every migration hashed equal
        settle(c, lambda: kv_idle(c))
        stats = c.stats()
        assert stats.transfers.num_transfers == len(PROMPTS) and stats.transfers.bytes > 0
        if num_prefill > 1 or num_decode > 1:  # shortest queue / least loaded spread the work
            assert len({o.metrics.breakdown.transfer_bytes for o in outputs.values()}) > 1
    for out in outputs.values():
        b, m = out.metrics.breakdown, out.metrics
        parts = [b.prefill_queue, b.prefill, b.transfer_queue, b.transfer, b.decode_queue]
        assert all(x is not None and x >= 0 for x in parts + [b.decode])
        assert m.ttft == pytest.approx(b.prefill_queue + b.prefill, abs=1e-6)
        assert m.e2e_latency >= sum(parts) + b.decode - 1e-6


def test_first_token_only_request_never_migrates_and_text_is_decoded():
    with _controller(Placement.disaggregated()) as c:
        assert c.tokenizer is None  # token ids only
        c.add_request("a", PROMPTS[0], greedy(1))
        out = drain(c)["a"]
        assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
        assert out.metrics.breakdown.transfer is None
        settle(c, lambda: kv_idle(c))


@pytest.mark.parametrize("mode", ["fail", "retry"])
def test_lease_expiry_reclaims_kv_and_fails_or_retries(mode):
    with _controller(
        Placement.disaggregated(), debug_pull_delay_s=math.inf, kv_lease_timeout_s=0.2,
        on_lease_expiry=mode, max_retries=1,
    ) as c:  # fmt: skip
        outputs = run(c, prompts=PROMPTS[:2], timeout_s=20)
        for out in outputs.values():
            assert out.outputs[0].finish_reason == "error"
            assert "kv_lease_timeout_s=0.2" in out.error
            # retry: prefilled again (prompt + first token), expired again, then given up
            assert ("max_retries=1" in out.error) == (mode == "retry")
            assert len(out.outputs[0].token_ids) == (2 if mode == "retry" else 1)
        settle(c, lambda: kv_idle(c))  # nothing leaked on either side


def test_back_pressure_stops_prefill_admission_and_loses_nothing(colocated_tokens):
    # Prefill pool: 12 blocks of 8 tokens; the 5 prompts need 20 blocks together. The decode
    # instance pulls nothing for its first seconds, so the prefill pool fills with KV.
    config = engine_config(kv_cache_memory_bytes=12 * 2 * 4 * 2 * 8 * 64 * 4)
    with _controller(Placement.disaggregated(), config, debug_pull_delay_s=3.0) as c:
        for i, p in enumerate(PROMPTS):
            c.add_request(str(i), p, greedy(MAX_TOKENS))
        settle(c, lambda: sum(r.phase is Phase.MIGRATING for r in c.requests.values()) >= 2)
        settle(c, lambda: c.stats().instances[0].num_waiting > 0)
        prefill = c.stats().instances[0]
        assert prefill.kv_usage > 0.5 and prefill.num_waiting > 0  # held back, not dropped
        outputs = drain(c)  # the decode side starts pulling: everything completes
        assert token_ids(outputs) == colocated_tokens
        settle(c, lambda: kv_idle(c))


def test_abort_in_every_stage_frees_all_kv():
    with _controller(Placement.disaggregated(), debug_pull_delay_s=math.inf) as c:
        c.add_request("migrating", PROMPTS[1], greedy(MAX_TOKENS))
        settle(c, lambda: c.requests["migrating"].phase is Phase.MIGRATING)
        c.add_request("prefilling", PROMPTS[4], greedy(MAX_TOKENS))
        assert c.abort_request("prefilling") and c.abort_request("migrating")
        assert not c.abort_request("unknown")
        outputs = drain(c)
        assert {o.outputs[0].finish_reason for o in outputs.values()} == {"abort"}
        settle(c, lambda: kv_idle(c))
    with _controller(Placement.disaggregated()) as c:
        c.add_request("decoding", PROMPTS[2], greedy(200), stream=True)
        settle(c, lambda: len(c.requests["decoding"].output_token_ids) >= 3)
        assert c.requests["decoding"].phase is Phase.DECODING
        assert c.abort_request("decoding")
        out = [o for o in drain(c).values()][-1]
        assert out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) < 200
        settle(c, lambda: kv_idle(c))


def test_a_burst_of_requests_before_any_step_does_not_deadlock_the_pipes():
    # Thousands of NewRequests fill the controller -> prefill pipe while the prefill
    # instance reports back; with blocking sends on both ends both loops waited forever.
    with _controller(Placement.disaggregated()) as c:
        num = 2000
        for i in range(num):
            c.add_request(str(i), [3 + (i * 7 + j) % 60 for j in range(4)], greedy(2))
        outputs = drain(c, timeout_s=120)
        assert len(outputs) == num
        assert all(len(o.outputs[0].token_ids) == 2 for o in outputs.values())

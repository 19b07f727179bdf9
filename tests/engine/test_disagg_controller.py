"""The disaggregated runtime in one process (instances on threads, real shm transfers):
greedy outputs equal colocated ones, KV arrives bit-exactly, leases, back-pressure, abort in
every stage, pull timeouts and failures, latency breakdown and stats. Time-dependent rules
run on a `faults.ManualClock` the test advances, and requests are held MIGRATING with
`FaultPlan.hold_pulls`: no test waits for wall-clock time. Spawned processes:
tests/e2e/test_disagg_e2e.py."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig, EngineConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.faults import FaultPlan, ManualClock
from distserve_rt.engine.disagg.puller import PULL_TIMEOUT_S
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


def _controller(
    placement: Placement, config: EngineConfig | None = None, plan: FaultPlan | None = None,
    **disagg,
):  # fmt: skip
    disagg.setdefault("launcher", "thread")
    return Controller(config or engine_config(), placement, DisaggConfig(**disagg), fault_plan=plan)


def _num_migrating(c: Controller, num_output_tokens: int = 1) -> int:
    return sum(
        r.phase is Phase.MIGRATING and len(r.output_token_ids) == num_output_tokens
        for r in c.requests.values()
    )


@pytest.fixture(scope="module")
def colocated_tokens():
    return _colocated(engine_config())


@pytest.mark.parametrize(("num_prefill", "num_decode"), [(1, 1), (2, 1), (1, 2)])
def test_greedy_equals_colocated_and_kv_arrives_bit_exactly(
    colocated_tokens, num_prefill, num_decode
):
    placement = Placement.disaggregated(PhaseConfig(num_instances=num_prefill),
                                        PhaseConfig(num_instances=num_decode))  # fmt: skip
    plan = FaultPlan(verify_kv=True)
    with _controller(placement, plan=plan) as c:
        # Start-up returns only once every decode instance mapped every prefill pool, so the
        # first requests' transfer queue time does not include the mapping.
        assert c._peers_opened == {h.name for h in c.decodes()}
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert token_ids(outputs) == colocated_tokens
        # Every migration's destination blocks hashed equal to its source blocks.
        assert plan.num_verified == len(PROMPTS) and plan.mismatches == []
        # The counters come with the instances' periodic reports: the last one in may
        # predate the last transfer, even with the pools idle (an idle report from before).
        settle(c, lambda: kv_idle(c) and c.stats().transfers.num_transfers == len(PROMPTS))
        stats = c.stats()
        assert stats.transfers.bytes > 0
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
    clock = ManualClock()
    plan = FaultPlan(clock=clock, hold_pulls=True)  # the KV waits on the prefill instance
    with _controller(
        Placement.disaggregated(), plan=plan, kv_lease_timeout_s=5.0, on_lease_expiry=mode,
        max_retries=1,
    ) as c:  # fmt: skip
        for i, p in enumerate(PROMPTS[:2]):
            c.add_request(str(i), p, greedy(MAX_TOKENS))
        settle(c, lambda: _num_migrating(c) == 2)
        clock.advance(4.0)
        # A third request's prefill proves the prefill loop ran at +4 s: no lease expired.
        c.add_request("2", PROMPTS[2], greedy(MAX_TOKENS))
        settle(c, lambda: _num_migrating(c) == 3)
        clock.advance(6.0)  # +10 s: the first two leases expired, the third (+6 s) too
        if mode == "retry":  # prefilled again (prompt + first token), expires again
            settle(c, lambda: _num_migrating(c, num_output_tokens=2) == 3)
            clock.advance(10.0)
        outputs = drain(c)
        for out in outputs.values():
            assert out.outputs[0].finish_reason == "error"
            assert "kv_lease_timeout_s=5.0" in out.error
            assert ("max_retries=1" in out.error) == (mode == "retry")  # then given up
            assert len(out.outputs[0].token_ids) == (2 if mode == "retry" else 1)
        settle(c, lambda: kv_idle(c))  # nothing leaked on either side


def test_back_pressure_stops_prefill_admission_and_loses_nothing(colocated_tokens):
    # Prefill pool: 12 blocks of 8 tokens; the 5 prompts need 20 blocks together. The decode
    # instance pulls nothing until the test lets it, so the prefill pool fills with KV.
    config = engine_config(kv_cache_memory_bytes=12 * 2 * 4 * 2 * 8 * 64 * 4)
    plan = FaultPlan(hold_pulls=True)
    with _controller(Placement.disaggregated(), config, plan) as c:
        for i, p in enumerate(PROMPTS):
            c.add_request(str(i), p, greedy(MAX_TOKENS))
        settle(c, lambda: _num_migrating(c) >= 2)
        settle(c, lambda: c.stats().instances[0].num_waiting > 0)
        prefill = c.stats().instances[0]
        assert prefill.kv_usage > 0.5 and prefill.num_waiting > 0  # held back, not dropped
        assert len(c.requests) == len(PROMPTS)
        plan.hold_pulls = False  # the decode side starts pulling: everything completes
        outputs = drain(c)
        assert token_ids(outputs) == colocated_tokens
        settle(c, lambda: kv_idle(c))


def test_abort_in_every_stage_frees_all_kv():
    with _controller(Placement.disaggregated(), plan=FaultPlan(hold_pulls=True)) as c:
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


@pytest.mark.parametrize("transport", ["shm", "fake"])
def test_a_pull_past_its_timeout_fails_its_request_and_the_instance_serves_on(transport):
    # The copy would be reported 1000 s after its submit; the decode instance's clock moves
    # past the puller's timeout (60 s) at once. The lease outlives both.
    clock = ManualClock()
    plan = FaultPlan(clock=clock, transfer_delay_s=1000.0)
    with _controller(
        Placement.disaggregated(), plan=plan, transport=transport, kv_lease_timeout_s=1e4
    ) as c:
        c.add_request("slow", PROMPTS[1], greedy(MAX_TOKENS))
        settle(c, lambda: c.stats().instances[1].kv_usage > 0)  # its pull holds decode blocks
        clock.advance(PULL_TIMEOUT_S)
        out = drain(c)["slow"]
        assert out.outputs[0].finish_reason == "error"
        assert f"KV pull not done after {PULL_TIMEOUT_S} s" in out.error
        # The copy cannot be cancelled: both sides keep their blocks until it ends...
        c.step(0.05)
        usage = [s.kv_usage for s in c.stats().instances]
        assert usage[0] > 0 and usage[1] > 0 and "slow" in c.migrations
        clock.advance(1000.0)
        settle(c, lambda: kv_idle(c))  # ... then the source KV and the decode blocks are freed
        assert not c.migrations
        plan.transfer_delay_s = 0.0
        c.add_request("after", PROMPTS[1], greedy(MAX_TOKENS))
        assert drain(c)["after"].outputs[0].finish_reason == "length"
        assert [s.alive for s in c.stats().instances] == [True, True]


def test_a_failing_transfer_fails_only_its_request(colocated_tokens):
    plan = FaultPlan(fail_transfers={"2"})
    with _controller(Placement.disaggregated(), plan=plan) as c:
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert outputs["2"].outputs[0].finish_reason == "error"
        assert "KV transfer failed: injected failure" in outputs["2"].error
        assert len(outputs["2"].outputs[0].token_ids) == 1  # the first token, from prefill
        for i in (0, 1, 3, 4):
            assert outputs[str(i)].outputs[0].token_ids == colocated_tokens[i]
        # The failure count comes with the decode instance's next report (see above); it
        # read 0 once when the last report in was an idle one from before the failure.
        settle(c, lambda: kv_idle(c) and c.stats().transfers.num_failures >= 1)
        assert c.stats().transfers.num_failures == 1


def test_a_fault_plan_needs_the_thread_launcher():
    with pytest.raises(ValueError, match="FaultPlan needs DisaggConfig.launcher='thread'"):
        Controller(engine_config(), Placement.disaggregated(), fault_plan=FaultPlan())


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

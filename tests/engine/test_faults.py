"""`faults.py` without instances: the clock a test moves, the plan's checks, `FaultyTransport`
over a `fake` transport (delay on the driven clock, injected failures, KV verification) and
`FaultyPuller` over a puller (the TP x PP decode instance's faults)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.core.request import Request
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.faults import (
    FaultPlan,
    FaultyPuller,
    FaultyTransport,
    ManualClock,
    kv_digest,
)
from distserve_rt.engine.disagg.kv_migration import KVPuller, PullGeometry
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import PullOutcome
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.transfer import KVSlice, Parallelism, TransferStatus
from distserve_rt.transfer.fake import FakeTransport
from tests.engine.disagg_helpers import engine_config

SPEC = KVCacheSpec(num_blocks=6, num_layers=2, num_kv_heads=2, head_dim=8, block_size=8)
DELAY_S = 2.0


# ---- ManualClock and FaultPlan --------------------------------------------------------------


def test_manual_clock_moves_only_when_told_and_never_back():
    clock = ManualClock(10.0)
    assert clock() == clock.now() == 10.0
    assert clock.advance(2.5) == 12.5
    clock.set(20.0)
    assert clock() == 20.0
    with pytest.raises(ValueError, match=r"dt must be >= 0 seconds .*got -1"):
        clock.advance(-1)
    with pytest.raises(ValueError, match=r"t must be >= the current reading 20.0, got 19.0"):
        clock.set(19.0)
    with pytest.raises(ValueError, match="start must be a number of seconds, got 'x'"):
        ManualClock("x")  # type: ignore[arg-type]


def test_manual_clock_starts_near_monotonic_time_by_default():
    import time

    before = time.monotonic()
    assert before <= ManualClock()() <= time.monotonic()


def test_manual_clock_is_safe_to_advance_from_several_threads():
    clock = ManualClock(0.0)
    threads = [threading.Thread(target=lambda: [clock.advance(1) for _ in range(1000)])
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock() == 4000


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        (dict(transfer_delay_s=-1.0), "transfer_delay_s must be >= 0 seconds, got -1.0"),
        (dict(transfer_delay_s=math.nan), "transfer_delay_s must be a number of seconds"),
        (dict(fail_transfers="a"), "fail_transfers must be a collection of request ids"),
        (dict(fail_transfers=3), "fail_transfers must be a collection of request ids"),
        (dict(clock=5.0), "clock must be callable"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_field(kwargs, why):
    with pytest.raises(ValueError, match=why):
        FaultPlan(**kwargs)


def test_fail_transfers_takes_ids_or_a_predicate():
    assert FaultPlan(fail_transfers={"a"}).fails("a")
    assert not FaultPlan(fail_transfers={"a"}).fails("b")
    assert FaultPlan(fail_transfers=lambda r: r.startswith("x")).fails("x1")
    assert not FaultPlan(fail_transfers={"a"}).fails(None)  # a transfer of no request


def test_a_plan_needs_the_thread_launcher_and_verifies_only_tp1_instances():
    plan = FaultPlan()
    with pytest.raises(ValueError, match="launcher='thread'.*got launcher='process'"):
        plan.check(Placement.disaggregated(), DisaggConfig())
    plan.check(Placement.disaggregated(), DisaggConfig(launcher="thread"))
    tp2 = Placement.disaggregated(PhaseConfig(), PhaseConfig(tp=2))
    plan.check(tp2, DisaggConfig(launcher="thread"))  # held pulls, delays: fine
    with pytest.raises(ValueError, match=r"verify_kv=True.*TP x PP instances"):
        FaultPlan(verify_kv=True).check(tp2, DisaggConfig(launcher="thread"))


def test_submitting_names_the_request_on_this_thread_only():
    plan = FaultPlan()
    seen = []
    with plan.submitting("a"):
        thread = threading.Thread(target=lambda: seen.append(plan.current_request))
        thread.start()
        thread.join()
        assert plan.current_request == "a"
    assert plan.current_request is None and seen == [None]


# ---- FaultyTransport ------------------------------------------------------------------------


class Pools:
    """A prefill pool (random KV) registered through one wrapped fake transport, a decode
    pool and another wrapped fake transport that pulls into it, on one plan."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.clock = plan.clock
        self.prefill = FaultyTransport(FakeTransport(clock=plan.now), plan)
        self.src = self.prefill.allocate_pool(SPEC)  # [6, 2, 2, 2, 8, 8]
        self.src.copy_(torch.randn(SPEC.shape))
        descriptor = self.prefill.register_pool(self.src)
        self.decode = FaultyTransport(FakeTransport(clock=plan.now), plan)
        self.dst = allocate_kv_pool(SPEC)
        self.peer = self.decode.open_peer(descriptor)

    def submit(self, src, dst, request_id: str | None = None, kv_slice=None):
        if request_id is None:
            return self.decode.submit(self.peer, self.dst, src, dst, kv_slice)
        with self.plan.submitting(request_id):
            return self.decode.submit(self.peer, self.dst, src, dst, kv_slice)


@pytest.fixture
def pools():
    p = Pools(FaultPlan(clock=ManualClock(100.0), transfer_delay_s=DELAY_S, verify_kv=True))
    yield p
    p.prefill.close()


def test_a_transfer_completes_at_the_delay_on_the_driven_clock_and_not_before(pools):
    handle = pools.submit([4, 1], [0, 3])
    assert handle.poll() is TransferStatus.TRANSFERRING  # the inner copy is done already
    pools.clock.set(float(np.nextafter(100.0 + DELAY_S, 0)))
    assert handle.poll() is TransferStatus.TRANSFERRING
    pools.clock.set(100.0 + DELAY_S)
    assert handle.poll() is TransferStatus.SUCCESS and handle.seconds == DELAY_S
    assert torch.equal(pools.dst[[0, 3]], pools.src[[4, 1]])
    stats = pools.decode.stats()
    assert (stats.num_submitted, stats.num_succeeded, stats.num_in_flight) == (1, 1, 0)
    assert stats.bytes_succeeded == 2 * SPEC.block_bytes
    assert pools.plan.num_verified == 1 and pools.plan.mismatches == []


def test_wait_returns_by_its_deadline_when_the_driven_clock_stands_still(pools):
    handle = pools.submit([0], [0])
    assert handle.wait(0.01) is TransferStatus.TRANSFERRING
    pools.clock.advance(DELAY_S)
    assert handle.wait(0.01) is TransferStatus.SUCCESS


def test_the_transfers_of_a_failing_request_end_failed_and_only_theirs(pools):
    pools.plan.fail_transfers = {"bad"}
    bad = pools.submit([0], [0], request_id="bad")
    good = pools.submit([1], [1], request_id="good")
    pools.clock.advance(DELAY_S)
    assert bad.poll() is TransferStatus.FAILED and "fail_transfers has 'bad'" in bad.error
    assert good.poll() is TransferStatus.SUCCESS
    assert pools.decode.stats().num_failed == 1


def test_an_inner_failure_stays_a_failure(pools):
    pools.decode.inner.inject_failures(1, "peer went away")  # type: ignore[attr-defined]
    handle = pools.submit([0], [0])
    pools.clock.advance(DELAY_S)
    assert handle.poll() is TransferStatus.FAILED and handle.error == "peer went away"


def test_verification_catches_a_block_corrupted_between_submit_and_completion(pools):
    handle = pools.submit([2, 5], [1, 4], request_id="r")
    assert handle.poll() is TransferStatus.TRANSFERRING  # copied, not reported yet
    pools.dst[4, 1, 0, 0, 0, 0] += 1.0  # one element of one destination block
    pools.clock.advance(DELAY_S)
    assert handle.poll() is TransferStatus.FAILED and "KV arrived corrupted" in handle.error
    assert pools.plan.num_verified == 0
    assert len(pools.plan.mismatches) == 1 and pools.plan.mismatches[0].startswith("r: ")


def test_verification_of_a_sliced_transfer_hashes_only_the_slice(pools):
    # Decode TP = 2, rank 1: head 1 of the source lands on head 0 of a half-width pool.
    half = allocate_kv_pool(
        KVCacheSpec(num_blocks=6, num_layers=2, num_kv_heads=1, head_dim=8, block_size=8)
    )
    half[3] = 7.0  # whatever the destination held outside the slice is not compared
    kv_slice = KVSlice(src_head_start=1, num_heads=1)
    handle = pools.decode.submit(pools.peer, half, [2], [3], kv_slice)
    pools.clock.advance(DELAY_S)
    assert handle.poll() is TransferStatus.SUCCESS and pools.plan.num_verified == 1
    assert torch.equal(half[3], pools.src[2][:, :, 1:2])


def test_verification_needs_the_source_registered_through_the_plan():
    plan = FaultPlan(verify_kv=True)
    plain = FakeTransport()
    src = plain.allocate_pool(SPEC)
    decode = FaultyTransport(FakeTransport(), plan)
    peer = decode.open_peer(plain.register_pool(src))
    with pytest.raises(ValueError, match="verify_kv: the source pool .* was not registered"):
        decode.submit(peer, allocate_kv_pool(SPEC), [0], [0])
    plain.close()


def test_kv_digest_covers_exactly_the_named_blocks_and_part():
    pool = torch.randn(SPEC.shape)
    digest = kv_digest(pool, [1, 2])
    pool[0] += 1
    assert kv_digest(pool, [1, 2]) == digest
    pool[2, 1, 0, 1] += 1  # layer 1, head 1
    assert kv_digest(pool, [1, 2]) != digest
    part = kv_digest(pool, [2], (0, 2, 0, 1))
    pool[2, :, :, 1] += 1  # outside head 0
    assert kv_digest(pool, [2], (0, 2, 0, 1)) == part


# ---- FaultyPuller (TP x PP decode instances) ------------------------------------------------


def _pull_setup(plan: FaultPlan):
    prefill = FakeTransport(clock=plan.now)
    src = prefill.allocate_pool(SPEC).copy_(torch.randn(SPEC.shape))
    descriptor = prefill.register_pool(src).to_bytes()
    geometry = PullGeometry(
        SPEC.num_layers, SPEC.num_kv_heads, Parallelism(1, 1), Parallelism(1, 1)
    )
    inner = KVPuller(FakeTransport(clock=plan.now), allocate_kv_pool(SPEC), geometry, timeout_s=10)
    puller = FaultyPuller(inner, plan)
    puller.open_peers({0: [descriptor]})
    return prefill, puller


def _start(puller, request_id: str, block: int, now: float) -> None:
    request = Request(request_id, 0, [1, 2, 3], SamplingParams(), 0.0, 64)
    migration = Migrate(request_id, 0, [block], [1, 2, 3, 4], 3, SamplingParams(), 0.0)
    puller.start(request, migration, np.array([block], np.int32), now)


def test_faulty_puller_holds_reports_until_the_delay_and_fails_named_requests():
    clock = ManualClock(0.0)
    plan = FaultPlan(clock=clock, transfer_delay_s=DELAY_S, fail_transfers={"bad"})
    prefill, puller = _pull_setup(plan)
    _start(puller, "good", 0, clock())
    _start(puller, "bad", 1, clock())
    assert puller.poll(clock()) == [] and puller.num_in_flight == 2  # copies done, held
    assert puller.inner.num_in_flight == 0
    clock.advance(DELAY_S)
    done = {d.pull.request.request_id: d for d in puller.poll(clock())}
    assert done["good"].outcome is PullOutcome.SUCCESS and done["good"].end_time == DELAY_S
    assert done["bad"].outcome is PullOutcome.FAILED and "fail_transfers" in done["bad"].error
    totals = puller.totals()
    assert (totals.num_transfers, totals.num_failures) == (1, 1)
    assert puller.num_in_flight == 0 and puller.poll(clock()) == []
    prefill.close()


def test_faulty_puller_times_out_a_pull_held_past_the_timeout():
    clock = ManualClock(0.0)
    prefill, puller = _pull_setup(FaultPlan(clock=clock, transfer_delay_s=100.0))
    _start(puller, "slow", 0, clock())
    assert puller.poll(clock()) == []
    clock.advance(10.0)
    (done,) = puller.poll(clock())
    assert done.outcome is PullOutcome.TIMED_OUT and "not done after 10.0 s" in done.error
    assert puller.num_in_flight == 1  # held in flight until the (delayed) report
    assert puller.poll(clock()) == []  # TIMED_OUT is reported once
    clock.advance(100.0)
    (final,) = puller.poll(clock())
    assert final.pull is done.pull and final.outcome is PullOutcome.SUCCESS
    assert puller.num_in_flight == 0 and puller.poll(clock()) == []
    assert puller.totals().num_failures == 1 and puller.totals().num_transfers == 0
    prefill.close()


@pytest.mark.parametrize(
    ("launcher", "decode"), [("process", PhaseConfig()), ("thread", PhaseConfig(tp=2))]
)
def test_the_fake_transport_runs_only_within_one_process(launcher, decode):
    dc = DisaggConfig(transport="fake", launcher=launcher)
    placement = Placement.disaggregated(PhaseConfig(), decode)
    with pytest.raises(ValueError, match=r"transport='fake'.*launcher='thread' and TP = PP = 1"):
        Controller(engine_config(), placement, dc)

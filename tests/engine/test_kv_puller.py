"""`KVPuller` (a TP = PP = 1 decode instance's pulls) without processes: real CPU pools,
`fake` transports on a clock the test moves, the `Puller` contract (each pull reported
once, failures, the timeout at exactly `timeout_s`, totals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.core.request import Request
from distserve_rt.engine.disagg.kv_migration import KVPuller, PullGeometry
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import PULL_TIMEOUT_S, PullOutcome
from distserve_rt.engine.protocol import TransferTotals
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.transfer import Parallelism
from distserve_rt.transfer.fake import FakeTransport

SPEC = KVCacheSpec(num_blocks=6, num_layers=2, num_kv_heads=2, head_dim=8, block_size=8)
BLOCK_BYTES = SPEC.block_bytes
TRANSFER_S = 1.0
TP1 = Parallelism(1, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0  # not 0: start times are the caller's clock, not offsets

    def __call__(self) -> float:
        return self.now


class Setup:
    """A prefill pool (TP = 1, random KV) and a decode instance's pool and puller."""

    def __init__(self, timeout_s: float = PULL_TIMEOUT_S) -> None:
        self.clock = Clock()
        self.prefill = FakeTransport(clock=self.clock)
        self.src = allocate_kv_pool(SPEC)  # [6, 2, 2, 2, 8, 8]
        self.src.copy_(torch.randn(SPEC.shape))
        descriptor = self.prefill.register_pool(self.src).to_bytes()
        self.transport = FakeTransport(transfer_delay_s=TRANSFER_S, clock=self.clock)
        self.dst = allocate_kv_pool(SPEC)  # zeros
        geometry = PullGeometry(SPEC.num_layers, SPEC.num_kv_heads, TP1, TP1)
        self.puller = KVPuller(self.transport, self.dst, geometry, timeout_s=timeout_s)
        self.puller.open_peers({0: [descriptor]})

    def start(self, request_id: str, src_blocks, dst_blocks):
        request = Request(request_id, 0, [1, 2, 3], SamplingParams(), 0.0, 64)
        migration = Migrate(request_id, 0, list(src_blocks), [1, 2, 3, 4], 3, SamplingParams(), 0.0)
        dst = np.array(dst_blocks, np.int32)
        self.puller.start(request, migration, dst, self.clock.now)
        return request, migration, dst

    def poll_at(self, seconds_after_start: float):
        self.clock.now = 100.0 + seconds_after_start
        return self.puller.poll(self.clock.now)


@pytest.fixture
def setup():
    s = Setup()
    yield s
    s.prefill.close()


def test_a_pull_copies_its_blocks_and_is_reported_once_when_final(setup):
    setup.start("r", src_blocks=[4, 1], dst_blocks=[0, 3])
    assert setup.puller.num_in_flight == 1 and list(setup.puller.pulls) == ["r"]
    assert setup.poll_at(TRANSFER_S / 2) == []  # start did not wait; still in flight
    assert not setup.dst.any()
    (done,) = setup.poll_at(TRANSFER_S)
    assert done.outcome is PullOutcome.SUCCESS and done.error is None
    assert done.pull.request.request_id == "r" and done.end_time == 100.0 + TRANSFER_S
    assert done.num_bytes == 2 * BLOCK_BYTES and done.seconds == TRANSFER_S
    assert torch.equal(setup.dst[[0, 3]], setup.src[[4, 1]])
    assert not setup.dst[[1, 2, 4, 5]].any()  # nothing else written
    assert setup.puller.num_in_flight == 0 and setup.poll_at(2 * TRANSFER_S) == []
    assert setup.puller.totals() == TransferTotals("fake", 1, 0, 2 * BLOCK_BYTES, TRANSFER_S)


def test_a_failed_transfer_ends_the_pull_failed_with_its_error(setup):
    setup.transport.inject_failures(1, "peer went away")
    setup.start("r", [0], [0])
    (done,) = setup.poll_at(TRANSFER_S)
    assert done.outcome is PullOutcome.FAILED and "peer went away" in done.error
    assert done.num_bytes == 0 and not setup.puller.pulls
    assert setup.puller.totals() == TransferTotals("fake", 0, 1, 0, 0.0)


def test_a_pull_past_timeout_s_times_out_and_stays_in_flight_until_its_copy_ends():
    s = Setup(timeout_s=5.0)
    s.transport.transfer_delay_s = 1e3  # a stuck copy
    s.start("stuck", [0], [0])
    s.clock.now = float(np.nextafter(105.0, 0.0))  # the last instant before the timeout
    assert s.puller.poll(s.clock.now) == []
    (done,) = s.poll_at(5.0)
    assert done.outcome is PullOutcome.TIMED_OUT and done.end_time == 105.0
    assert done.error == "KV pull not done after 5.0 s (the puller's timeout_s)"
    # No backend cancels a started copy: the pull stays in flight (its blocks untouched)...
    assert list(s.puller.pulls) == ["stuck"] and s.puller.pulls["stuck"].timed_out
    assert s.poll_at(10.0) == []  # ... reported TIMED_OUT once ...
    (final,) = s.poll_at(1e3)  # ... and again when the copy ended, with its real outcome
    assert final.pull is done.pull and final.outcome is PullOutcome.SUCCESS
    assert not s.puller.pulls and s.poll_at(1e4) == []
    assert s.puller.totals() == TransferTotals("fake", 0, 1, 0, 0.0)  # one failure, once
    s.prefill.close()


def test_the_default_timeout_is_pull_timeout_s(setup):
    assert setup.puller.timeout_s == PULL_TIMEOUT_S
    setup.transport.transfer_delay_s = 2 * PULL_TIMEOUT_S
    setup.start("stuck", [0], [0])
    assert setup.poll_at(PULL_TIMEOUT_S - 1.0) == []
    assert [d.outcome for d in setup.poll_at(PULL_TIMEOUT_S)] == [PullOutcome.TIMED_OUT]


def test_a_pull_final_before_the_timeout_succeeds_even_when_polled_after_it():
    s = Setup(timeout_s=5.0)
    s.start("r", [2], [1])
    (done,) = s.poll_at(50.0)  # the loop was busy: the copy ended long ago
    assert done.outcome is PullOutcome.SUCCESS
    s.prefill.close()


def test_totals_add_up_over_pulls_that_end_differently(setup):
    setup.start("a", [0, 1], [0, 1])
    setup.clock.now += 0.5
    setup.start("b", [2], [2])
    setup.transport.inject_failures(1, "lost")
    setup.start("c", [3], [3])
    assert sorted(d.pull.request.request_id for d in setup.poll_at(TRANSFER_S)) == ["a"]
    done = {d.pull.request.request_id: d.outcome for d in setup.poll_at(0.5 + TRANSFER_S)}
    assert done == {"b": PullOutcome.SUCCESS, "c": PullOutcome.FAILED}
    assert setup.puller.totals() == TransferTotals(
        "fake", num_transfers=2, num_failures=1, bytes=3 * BLOCK_BYTES, seconds=2 * TRANSFER_S
    )
    totals = setup.puller.totals()
    totals.num_transfers = 99  # a copy: the puller's own count is not the caller's
    assert setup.puller.totals().num_transfers == 2


def test_a_resliced_pull_moves_each_source_ranks_heads():
    # Prefill TP = 2: each of its pools holds one KV head; this TP = 1 pool holds both.
    clock = Clock()
    prefill = FakeTransport(clock=clock)
    half = KVCacheSpec(num_blocks=6, num_layers=2, num_kv_heads=1, head_dim=8, block_size=8)
    srcs = [allocate_kv_pool(half).copy_(torch.randn(half.shape)) for _ in range(2)]
    descriptors = [prefill.register_pool(p).to_bytes() for p in srcs]
    dst = allocate_kv_pool(SPEC)
    geometry = PullGeometry(SPEC.num_layers, SPEC.num_kv_heads, Parallelism(2, 1), TP1)
    puller = KVPuller(FakeTransport(clock=clock), dst, geometry)
    puller.open_peers({0: descriptors})
    request = Request("r", 0, [1, 2, 3], SamplingParams(), 0.0, 64)
    migration = Migrate("r", 0, [3], [1, 2, 3, 4], 3, SamplingParams(), 0.0)
    puller.start(request, migration, np.array([5], np.int32), clock.now)
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.SUCCESS and done.num_bytes == BLOCK_BYTES
    assert len(done.pull.handles) == 2  # one transfer per source rank
    assert torch.equal(dst[5], torch.cat([srcs[0][3], srcs[1][3]], dim=2))
    prefill.close()


def test_start_refuses_what_it_cannot_pull_and_keeps_nothing(setup):
    with pytest.raises(ValueError, match="2 source blocks but 1 destination blocks"):
        setup.start("r", [0, 1], [0])
    with pytest.raises(ValueError, match="no pool descriptor for prefill-0"):
        setup.puller._peers.clear()
        setup.start("r", [0], [0])
    assert not setup.puller.pulls


def test_a_request_cannot_be_pulled_twice_at_once(setup):
    setup.start("r", [0], [0])
    with pytest.raises(ValueError, match="'r' is already being pulled"):
        setup.start("r", [1], [1])
    assert len(setup.poll_at(TRANSFER_S)) == 1


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan"), "60", True])
def test_timeout_s_must_be_positive_seconds(timeout_s):
    geometry = PullGeometry(SPEC.num_layers, SPEC.num_kv_heads, TP1, TP1)
    with pytest.raises(ValueError, match=f"timeout_s must be .*got {timeout_s!r}"):
        KVPuller(FakeTransport(), allocate_kv_pool(SPEC), geometry, timeout_s=timeout_s)

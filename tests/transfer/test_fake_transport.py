"""The fake transport's state machine (what the engine's lease/timeout logic is tested
against): PENDING -> TRANSFERRING -> SUCCESS on a hand-driven clock, wait timeouts,
injected failures, vanished peers, stats."""

from __future__ import annotations

import time

import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import KVSlice, PeerUnavailableError, TransferStatus, create_transport
from distserve_rt.transfer.fake import FakeTransport

SPEC = KVCacheSpec(num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=8, block_size=8)


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _source(transport: FakeTransport):
    pool = transport.allocate_pool(SPEC)
    pool.copy_(torch.randn(SPEC.shape))
    return pool, transport.open_peer(transport.register_pool(pool))


def test_states_follow_the_delays():
    clock = ManualClock()
    transport = FakeTransport(queue_delay_s=1.0, transfer_delay_s=2.0, clock=clock)
    src, peer = _source(transport)
    dst = torch.zeros(SPEC.shape)
    handle = transport.submit(peer, dst, [3, 1], [0, 2])
    assert handle.poll() == TransferStatus.PENDING
    clock.now += 1.5
    assert handle.poll() == TransferStatus.TRANSFERRING
    assert torch.count_nonzero(dst) == 0  # nothing lands before completion
    clock.now += 1.5
    assert handle.poll() == TransferStatus.SUCCESS
    assert torch.equal(dst[0], src[3]) and torch.equal(dst[2], src[1])
    assert handle.seconds == pytest.approx(3.0)
    stats = transport.stats()
    assert (stats.num_succeeded, stats.num_in_flight) == (1, 0)
    assert stats.bytes_succeeded == 2 * SPEC.block_bytes


def test_wait_times_out_while_pending():
    transport = FakeTransport(queue_delay_s=30.0)
    _, peer = _source(transport)
    handle = transport.submit(peer, torch.zeros(SPEC.shape), [0], [0])
    start = time.monotonic()
    assert handle.wait(0.05) == TransferStatus.PENDING
    assert 0.04 <= time.monotonic() - start < 1.0
    assert transport.stats().num_in_flight == 1


def test_wait_returns_at_completion():
    transport = FakeTransport(transfer_delay_s=0.05)
    _, peer = _source(transport)
    handle = transport.submit(peer, torch.zeros(SPEC.shape), [0], [0])
    assert handle.wait(10.0) == TransferStatus.SUCCESS
    assert handle.seconds < 5.0


def test_injected_failure_then_success():
    transport = FakeTransport()
    _, peer = _source(transport)
    transport.inject_failures(1, "link down")
    dst = torch.zeros(SPEC.shape)
    failed = transport.submit(peer, dst, [0], [0])
    ok = transport.submit(peer, dst, [1], [1])
    assert failed.poll() == TransferStatus.FAILED and failed.error == "link down"
    assert ok.poll() == TransferStatus.SUCCESS
    assert torch.count_nonzero(dst[0]) == 0
    stats = transport.stats()
    assert (stats.num_failed, stats.num_succeeded, stats.bytes_succeeded) == (
        1, 1, SPEC.block_bytes,
    )  # fmt: skip


def test_vanished_peer():
    clock = ManualClock()
    transport = FakeTransport(queue_delay_s=1.0, clock=clock)
    src, peer = _source(transport)
    handle = transport.submit(peer, torch.zeros(SPEC.shape), [0], [0])
    FakeTransport.unregister(peer)
    clock.now += 2.0
    assert handle.poll() == TransferStatus.FAILED
    assert "unregistered" in handle.error
    with pytest.raises(PeerUnavailableError, match="not registered"):
        transport.open_peer(peer)


def test_slice_and_id_checks_match_other_backends():
    transport = FakeTransport()
    src, peer = _source(transport)
    small = torch.zeros(2, 2, 2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"destination KV heads \[0, 2\)"):
        transport.submit(peer, small, [0], [0])
    handle = transport.submit(peer, small, [2], [1], KVSlice(src_head_start=1, num_heads=1))
    assert handle.poll() == TransferStatus.SUCCESS
    assert torch.equal(small[1], src[2][:, :, 1:2])
    with pytest.raises(ValueError, match="src block id 9"):
        transport.submit(peer, small, [9], [0], KVSlice(num_heads=1))


def test_create_transport_names():
    assert create_transport("fake").name == "fake"
    with pytest.raises(ValueError, match="unknown transport 'rdma'; choose one of shm, cuda_ipc"):
        create_transport("rdma")
    with pytest.raises(ValueError, match="queue_delay_s"):
        create_transport("fake", queue_delay_s=-1.0)

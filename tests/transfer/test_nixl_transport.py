"""nixl transport: descriptor layout, staging ranges, argument checks, and the failure rules
NIXL does not give by itself (a deadline per transfer, no late write into the caller's
blocks, a dead peer fails fast). Peers are real processes; UCX runs over TCP, the path
between nodes (on one host UCX would otherwise pick cma)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import (
    PeerUnavailableError,
    PoolDescriptor,
    TransferStatus,
    create_transport,
    nixl_layout,
)
from distserve_rt.transfer.nixl import encode_handle
from distserve_rt.transfer.nixl_staging import StagingRanges
from tests.transfer.peer_process import PeerProcess, bits, random_pool, ucx_over_tcp

SPEC = KVCacheSpec(num_blocks=8, num_layers=4, num_kv_heads=4, head_dim=16, block_size=8)
BIG = KVCacheSpec(num_blocks=64, num_layers=4, num_kv_heads=8, head_dim=64, block_size=16)


class DrivenClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module", autouse=True)
def _tcp():
    with ucx_over_tcp():
        yield


def _desc(spec: KVCacheSpec) -> PoolDescriptor:
    pool = torch.zeros(spec.shape, dtype=spec.dtype)
    return PoolDescriptor(
        "nixl", encode_handle(0x1000, b"md"), 0, pool.numel() * 4, spec.num_blocks,
        spec.num_layers, spec.num_kv_heads, spec.block_size, spec.head_dim, "float32",
        pool.stride(0) * 4, 1,
    )  # fmt: skip


# -- layout and staging (no NIXL) -------------------------------------------------------------


def test_layout_picks_the_coarsest_run():
    desc = _desc(SPEC)
    head = desc.head_bytes  # 8 * 16 * 4
    whole = nixl_layout.run_layout(desc, (0, 0, 4, 0, 0, 4))
    assert whole.kind == ("block",) and whole.run_bytes == 4 * 2 * 4 * head
    layers = nixl_layout.run_layout(desc, (1, 0, 2, 0, 0, 4))
    assert layers.kind == ("layer",) and layers.run_bytes == 2 * 4 * head
    assert nixl_layout.remote_indices(np.array([0, 3]), layers).tolist() == [1, 2, 13, 14]
    heads = nixl_layout.run_layout(desc, (1, 0, 1, 2, 0, 2))
    assert heads.kind == ("head", 2, 2) and heads.run_bytes == 2 * head
    assert nixl_layout.remote_indices(np.array([1]), heads).tolist() == [10, 11]
    addrs = nixl_layout.remote_descs(desc, 0x1000, heads)[:, 0]
    # block 1, layer 1, V: past one block, 3 (layer, K|V) runs of 4 heads, then 2 heads in.
    assert int(addrs[11]) == 0x1000 + desc.block_stride_bytes + 3 * 4 * head + 2 * head


def test_staging_ranges_first_fit_and_merge():
    ranges = StagingRanges(1024)
    a, b, c = ranges.take(256), ranges.take(100), ranges.take(512)
    assert (a, b, c) == (0, 256, 384) and ranges.take(200) is None  # 128 left
    ranges.give_back(b, 100)
    assert ranges.take(128) == 256
    ranges.give_back(256, 128)
    ranges.give_back(a, 256)
    ranges.give_back(c, 512)
    assert ranges.num_bytes_used == 0 and ranges.take(1024) == 0


# -- one process, two agents --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """(producer, consumer, source pool, its peer) in this process, over TCP loopback."""
    clock = DrivenClock()
    producer = create_transport("nixl")
    consumer = create_transport("nixl", clock=clock, staging_bytes=3 * SPEC.block_bytes)
    src = producer.allocate_pool(SPEC)
    src.copy_(random_pool(SPEC, 5))
    peer = consumer.open_peer(producer.register_pool(src))
    yield producer, consumer, src, peer
    consumer.close()
    producer.close()


def test_bad_arguments_rejected_before_anything_moves(pair):
    _, consumer, _, peer = pair
    dst = torch.zeros(SPEC.shape)
    submitted = consumer.stats().num_submitted
    with pytest.raises(ValueError, match=r"src block id 8 \(pair 1\)"):
        consumer.submit(peer, dst, [0, 8], [0, 1])
    with pytest.raises(ValueError, match="both write dst block 2"):
        consumer.submit(peer, dst, [0, 1], [2, 2])
    with pytest.raises(ValueError, match="dtype"):
        consumer.submit(peer, dst.half(), [0], [0])
    with pytest.raises(ValueError, match="moves 65536 bytes, more than .* staging_bytes=49152"):
        consumer.submit(peer, dst, [0, 1, 2, 3], [0, 1, 2, 3])
    with pytest.raises(NotImplementedError, match="VRAM"):
        consumer.submit(peer, torch.zeros(SPEC.shape, device="meta"), [0], [0])
    with pytest.raises(ValueError, match="transport 'shm'"):
        consumer.open_peer(_shm_desc())
    with pytest.raises(PeerUnavailableError, match="NIXL metadata"):
        consumer.open_peer(_desc(SPEC))
    assert consumer.stats().num_submitted == submitted and torch.count_nonzero(dst) == 0


def _shm_desc() -> PoolDescriptor:
    desc = _desc(SPEC)
    return PoolDescriptor.from_bytes(desc.to_bytes().replace(b'"nixl"', b'"shm"'))


def test_constructor_checks_and_ucx_defaults(monkeypatch):
    with pytest.raises(ValueError, match="deadline_s must be > 0"):
        create_transport("nixl", deadline_s=0)
    with pytest.raises(ValueError, match="staging capacity"):
        create_transport("nixl", staging_bytes=8)
    monkeypatch.setenv("UCX_TCP_TX_SEG_SIZE", "32K")
    create_transport("nixl").close()
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == "32K"  # a user's value wins
    monkeypatch.setenv("UCX_TCP_TX_SEG_SIZE", "128K")  # above UCX's RX segment: refused
    with pytest.raises(RuntimeError, match="NIXL could not start its UCX backend"):
        create_transport("nixl")
    monkeypatch.delenv("UCX_TCP_TX_SEG_SIZE")
    create_transport("nixl").close()
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == "64K"


def test_full_staging_queues_then_starts(pair):
    _, consumer, src, peer = pair
    dst = torch.zeros(SPEC.shape)
    first = consumer.submit(peer, dst, [0, 1], [0, 1])  # 2 of the 3 staging blocks
    second = consumer.submit(peer, dst, [2, 3], [2, 3])
    empty = consumer.submit(peer, dst, [], [])
    assert second.poll() == TransferStatus.PENDING
    assert empty.poll() == TransferStatus.SUCCESS
    assert first.wait(10.0) == TransferStatus.SUCCESS, first.error
    assert second.wait(10.0) == TransferStatus.SUCCESS, second.error
    assert torch.equal(bits(dst[:4]), bits(src[:4]))


def test_copy_out_of_staging_runs_off_the_polling_thread(pair, monkeypatch):
    _, consumer, src, peer = pair
    threads = []
    copy_out = type(consumer)._copy_out

    def recording(self, transfer):
        threads.append(threading.current_thread().name)
        copy_out(self, transfer)

    monkeypatch.setattr(type(consumer), "_copy_out", recording)
    dst = torch.zeros(SPEC.shape)
    handle = consumer.submit(peer, dst, [6, 7], [0, 1])
    assert handle.wait(10.0) == TransferStatus.SUCCESS, handle.error
    assert torch.equal(bits(dst[:2]), bits(src[6:8]))
    assert len(threads) == 1 and threads[0].startswith("nixl-copy-out")


def test_queued_transfer_fails_at_its_deadline(pair):
    _, consumer, _, peer = pair
    clock = consumer._clock
    dst = torch.zeros(SPEC.shape)
    # Holds the staging buffer while the clock stands still.
    first = consumer.submit(peer, dst, [0, 1], [0, 1])
    queued = consumer.submit(peer, dst, [2, 3], [2, 3])
    assert queued.poll() == TransferStatus.PENDING
    clock.now += consumer.deadline_s
    assert queued.poll() == TransferStatus.FAILED
    assert "deadline_s=20.0" in queued.error and "staging room" in queued.error
    first.wait(10.0)  # done or past the deadline too: either way final
    assert first.poll().is_final
    assert torch.count_nonzero(dst[2:4]) == 0


# -- a real peer process that freezes or dies ----------------------------------------------------


@pytest.fixture
def frozen_peer():
    """A producer process with a pool of BIG, already connected (one warm-up pull), so that
    stopping it later freezes an established connection, as a hung node would."""
    clock = DrivenClock()
    child = PeerProcess("nixl")
    consumer = create_transport("nixl", clock=clock, deadline_s=5.0)
    peer = consumer.open_peer(PoolDescriptor.from_bytes(child.alloc(BIG, seed=9)))
    warm = consumer.submit(peer, torch.zeros(BIG.shape), [0], [0])
    assert warm.wait(30.0) == TransferStatus.SUCCESS, warm.error
    yield child, consumer, peer, clock
    if child.process.is_alive():
        os.kill(child.pid, signal.SIGCONT)
        child.exit()
    consumer.close()


def test_stopped_peer_fails_at_the_deadline_and_cannot_write_late(frozen_peer):
    child, consumer, peer, clock = frozen_peer
    os.kill(child.pid, signal.SIGSTOP)
    dst = torch.zeros(BIG.shape)
    handle = consumer.submit(peer, dst, range(BIG.num_blocks), range(BIG.num_blocks))
    assert handle.wait(0.3) == TransferStatus.TRANSFERRING  # a frozen peer never answers
    clock.now += 4.9
    assert handle.poll() == TransferStatus.TRANSFERRING
    clock.now += 0.1
    assert handle.poll() == TransferStatus.FAILED
    assert "deadline_s=5.0" in handle.error and "READ in flight" in handle.error
    assert consumer.num_quarantined_bytes == BIG.num_blocks * BIG.block_bytes
    # The peer wakes up: the READ ends into the quarantined staging range, never into dst
    # (which the caller owns again since FAILED).
    os.kill(child.pid, signal.SIGCONT)
    end = time.monotonic() + 30.0
    while consumer.num_quarantined_bytes and time.monotonic() < end:
        time.sleep(0.01)
    assert consumer.num_quarantined_bytes == 0
    assert torch.count_nonzero(dst) == 0
    again = consumer.submit(peer, dst, [3], [3])
    assert again.wait(30.0) == TransferStatus.SUCCESS, again.error
    assert torch.equal(bits(dst[3]), bits(random_pool(BIG, 9)[3]))


def test_killed_peer_fails_fast_not_at_the_deadline(frozen_peer):
    child, consumer, peer, clock = frozen_peer
    os.kill(child.pid, signal.SIGSTOP)  # the READ is surely in flight when the kill lands
    handle = consumer.submit(peer, torch.zeros(BIG.shape), range(BIG.num_blocks),
                             range(BIG.num_blocks))  # fmt: skip
    assert handle.poll() == TransferStatus.TRANSFERRING
    child.kill()
    # The driven clock stands still, so only NIXL's error can end the transfer.
    assert handle.wait(20.0) == TransferStatus.FAILED
    assert "NIXL reported an error" in handle.error, handle.error
    assert consumer.num_quarantined_bytes == 0


def test_progress_thread_pause_replaces_nixls_busy_loop():
    # NIXL's Python agent sets pthrDelay = 0 (a busy loop: half a core per idle process on
    # this machine); the transport substitutes its progress_delay_us while the agent is built.
    import nixl_cu12

    from distserve_rt.transfer.nixl import _progress_delay

    with _progress_delay(nixl_cu12, 123):
        config = nixl_cu12._api.nixlBind.nixlAgentConfig()
        config.pthrDelay = 0
        assert config.pthrDelay == 123
    config = nixl_cu12._api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 0
    assert config.pthrDelay == 0  # restored afterwards
    with pytest.raises(ValueError, match="progress_delay_us must be an int in"):
        create_transport("nixl", progress_delay_us=-1)


def test_missing_wheel_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_cu12", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install nixl-cu12==1\.5\.1"):
        create_transport("nixl")

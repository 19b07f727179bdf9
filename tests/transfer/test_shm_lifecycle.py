"""shm transport lifecycle: vanished peers fail clearly, bad ids are rejected before any
copy, regions are reclaimed (close, clean exit, sweep after SIGKILL)."""

from __future__ import annotations

import os

import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import (
    PeerUnavailableError,
    PoolDescriptor,
    TransferStatus,
    create_transport,
)
from distserve_rt.transfer.shm_region import (
    NAME_PREFIX,
    SHM_DIR,
    region_glob,
    sweep_stale_regions,
)
from tests.transfer.peer_process import PeerProcess

SPEC = KVCacheSpec(num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=8, block_size=8)


def _regions_of(pid: int) -> set[str]:
    return {p.name for p in SHM_DIR.glob(region_glob(pid))}


@pytest.fixture
def transport():
    with create_transport("shm") as t:
        yield t


def test_local_pools_are_unlinked_on_close():
    transport = create_transport("shm")
    transport.allocate_pool(SPEC)
    transport.allocate_pool(SPEC)
    assert len(_regions_of(os.getpid())) == 2
    transport.close()
    assert _regions_of(os.getpid()) == set()


def test_bad_ids_rejected_before_any_copy(transport):
    src = transport.allocate_pool(SPEC)
    src.fill_(1.0)
    peer = transport.open_peer(transport.register_pool(src))
    dst = torch.zeros(SPEC.shape)
    with pytest.raises(ValueError, match=r"src block id 4 \(pair 1\) .*source pool has 4 blocks"):
        transport.submit(peer, dst, [0, 4], [0, 1])
    with pytest.raises(ValueError, match=r"dst block id -1 \(pair 1\) .*destination pool has 4"):
        transport.submit(peer, dst, [0, 1], [2, -1])
    with pytest.raises(ValueError, match="pairs 0 and 1 both write dst block 2"):
        transport.submit(peer, dst, [0, 1], [2, 2])
    assert transport.stats().num_submitted == 0
    assert torch.count_nonzero(dst) == 0


def test_incompatible_pools_rejected(transport):
    peer = transport.open_peer(transport.register_pool(transport.allocate_pool(SPEC)))
    with pytest.raises(ValueError, match="dtype"):
        transport.submit(peer, torch.zeros(SPEC.shape, dtype=torch.float16), [0], [0])
    with pytest.raises(ValueError, match="head_dim"):
        transport.submit(peer, torch.zeros(4, 2, 2, 2, 8, 16), [0], [0])


def test_register_rejects_pool_not_in_shared_memory(transport):
    with pytest.raises(ValueError, match="allocate_pool"):
        transport.register_pool(torch.zeros(SPEC.shape))


def test_peer_lifecycle_unlink_exit_and_kill(transport):
    """One child walks through every way a peer disappears (each spawn costs ~1 s)."""
    child = PeerProcess("shm")
    desc_a = PoolDescriptor.from_bytes(child.alloc(SPEC, seed=1))
    desc_b = PoolDescriptor.from_bytes(child.alloc(SPEC, seed=2))
    peer_a = transport.open_peer(desc_a)
    assert len(_regions_of(child.pid)) == 2

    # Unlinked after open: the mapping stays valid, but new transfers fail with a message.
    child.call("close_pool", 0)
    handle = transport.submit(peer_a, torch.zeros(SPEC.shape), [0], [0])
    assert handle.wait(10.0) == TransferStatus.FAILED
    assert "unlinked" in handle.error and "owner" in handle.error
    assert transport.stats().num_failed == 1
    with (
        create_transport("shm", sweep=False) as other,
        pytest.raises(PeerUnavailableError, match="closed the pool or exited"),
    ):
        other.open_peer(desc_a)

    # SIGKILL: no cleanup runs, the region is left behind until a sweep.
    child.kill()
    assert _regions_of(child.pid) == {desc_b.handle}
    assert desc_b.handle in sweep_stale_regions()
    assert _regions_of(child.pid) == set()
    with pytest.raises(PeerUnavailableError, match=rf"process {child.pid}"):
        transport.open_peer(desc_b)


def test_clean_exit_unlinks_and_open_fails(transport):
    child = PeerProcess("shm")
    desc = PoolDescriptor.from_bytes(child.alloc(SPEC, seed=3))
    child.exit()
    assert _regions_of(child.pid) == set()
    with pytest.raises(PeerUnavailableError, match="No such file"):
        transport.open_peer(desc)


def test_sweep_keeps_live_regions(transport):
    transport.allocate_pool(SPEC)
    assert sweep_stale_regions() == []
    assert len(_regions_of(os.getpid())) == 1


def test_sweep_leaves_regions_of_other_pid_namespaces_alone():
    # Containers sharing /dev/shm (--ipc=host) have their own pids: a pid that is dead here
    # may be a live owner there.
    other_namespace = int(region_glob(0).split("_")[2]) + 1
    foreign = SHM_DIR / f"{NAME_PREFIX}{other_namespace}_{2**22 + 1}_abcdef"
    ours = SHM_DIR / region_glob(2**22 + 1).replace("*", "abcdef")  # beyond pid_max: dead
    huge = SHM_DIR / region_glob(2**80).replace("*", "abcdef")  # no pid at all: os.kill fails
    for path in (foreign, ours, huge):
        path.write_bytes(b"x")
    try:
        assert sorted(sweep_stale_regions()) == sorted([ours.name, huge.name])
        assert foreign.exists() and not ours.exists()
    finally:
        for path in (foreign, ours, huge):
            path.unlink(missing_ok=True)


def test_wait_rejects_bad_timeout_and_close_peer_while_idle(transport):
    pool = transport.allocate_pool(SPEC)
    peer = transport.open_peer(transport.register_pool(pool))
    handle = transport.submit(peer, torch.zeros(SPEC.shape), [1], [1])
    with pytest.raises(ValueError, match="timeout_s"):
        handle.wait(float("nan"))
    assert handle.wait(10.0) == TransferStatus.SUCCESS
    assert handle.wait(0.0) == TransferStatus.SUCCESS  # final status is sticky
    transport.close_peer(peer)
    with pytest.raises(ValueError, match="unknown region"):
        transport.submit(peer, torch.zeros(SPEC.shape), [1], [1])

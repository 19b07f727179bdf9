"""The `shm` transport: CPU instances on one machine, KV pools in POSIX shared memory.

The producer allocates its pool in a shared region (`allocate_pool`) and exports the region
name (`register_pool`). The consumer maps that region read-only once (`open_peer`, cached)
and pulls block slices into its own pool on the native engine's worker thread (memcpy of
contiguous runs; see include/distserve_rt/transfer/block_slice.h), so `submit` returns at
once. Lifetime: the producer keeps its pool registered (the region linked) until every
transfer reading it reached a final status; a transfer whose region was unlinked before it
started is FAILED ("owner closed the pool or exited").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt import _native
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import native_engine
from distserve_rt.transfer.base import (
    KVTransport,
    PeerUnavailableError,
    TransferHandle,
    TransferStats,
    TransferStatus,
)
from distserve_rt.transfer.descriptor import (
    KVSlice,
    PoolDescriptor,
    describe_pool,
    plan_submit,
)
from distserve_rt.transfer.shm_region import SharedRegion, sweep_stale_regions


@dataclass(frozen=True, slots=True)
class ShmPeer:
    """A peer pool mapped into this process (what `submit` takes)."""

    descriptor: PoolDescriptor
    region_id: int


class ShmTransport(KVTransport):
    """KV transfer between CPU processes through POSIX shared memory.

    Args:
        num_copy_threads: OpenMP threads of the copy worker (1: the worker thread alone).
        spin_us: microseconds the worker spins for new work after a batch, and `wait`
            for the final status, before sleeping on a futex. Spinning keeps a small
            transfer's fixed cost low (a futex hand-off costs ~25 us in a VM) at the price
            of a core busy for that long after activity; 0 never spins.
        sweep: unlink leftover regions of dead processes at start-up (see `shm_region`).
    """

    name = "shm"

    def __init__(self, num_copy_threads: int = 1, spin_us: float = 50.0, sweep: bool = True):
        if not isinstance(num_copy_threads, int) or num_copy_threads < 1:
            raise ValueError(f"num_copy_threads must be an int >= 1, got {num_copy_threads!r}")
        if not 0 <= spin_us <= 1e6:
            raise ValueError(f"spin_us must be in [0, 1e6] microseconds, got {spin_us!r}")
        if sweep:
            sweep_stale_regions()
        self._engine = _native.cpu_module().ShmTransferEngine(num_copy_threads, float(spin_us))
        self._owned: dict[int, SharedRegion] = {}  # data_ptr -> region
        self._peers: dict[tuple, ShmPeer] = {}
        self._closed = False

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        region = SharedRegion(spec.num_blocks * spec.block_bytes)
        pool = region.as_tensor(spec.shape, spec.dtype)
        self._owned[pool.data_ptr()] = region
        return pool

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        region = self._owned.get(pool.data_ptr()) if isinstance(pool, torch.Tensor) else None
        if region is None:
            raise ValueError(
                "the shm transport exports only pools it allocated in shared memory: create "
                "the pool with transport.allocate_pool(spec)"
            )
        return describe_pool(
            pool, transport=self.name, handle=region.name, offset_bytes=0,
            region_bytes=region.nbytes,
        )  # fmt: skip

    def unregister_pool(self, pool: torch.Tensor) -> None:
        """Unlinks the pool's region: peers can no longer open it, and their transfers that
        have not started fail. Call it once every transfer reading the pool is final; the
        tensor stays usable here."""
        region = self._owned.pop(pool.data_ptr(), None)
        if region is None:
            raise ValueError("pool was not allocated by this transport (or already unregistered)")
        region.close()

    def open_peer(self, descriptor: PoolDescriptor) -> ShmPeer:
        if descriptor.transport != self.name:
            raise ValueError(
                f"descriptor is for transport {descriptor.transport!r}; this is {self.name!r}"
            )
        peer = self._peers.get(descriptor.key)
        if peer is not None:
            return peer
        rc = self._engine.open_region(descriptor.handle, descriptor.region_bytes)
        if rc < 0:
            reason = (
                "the region is smaller than the descriptor says"
                if -rc == 75  # EOVERFLOW
                else os.strerror(-rc)
            )
            raise PeerUnavailableError(
                f"cannot open the KV pool of process {descriptor.owner_pid} (shm region "
                f"/dev/shm/{descriptor.handle}): {reason}. Its owner closed the pool or "
                "exited, or it runs on another machine."
            )
        peer = ShmPeer(descriptor, rc)
        self._peers[descriptor.key] = peer
        return peer

    def close_peer(self, peer: ShmPeer) -> None:
        """Unmaps a peer pool (ValueError while transfers reading it are in flight)."""
        self._engine.close_region(peer.region_id)
        del self._peers[peer.descriptor.key]

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if not isinstance(peer, ShmPeer):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        desc = peer.descriptor
        if dst_pool.device.type != "cpu":
            raise ValueError(f"dst_pool must be a CPU tensor for shm, got {dst_pool.device}")
        # check_ids=False: the engine checks the ids (same rules and words) before queueing.
        plan = plan_submit(desc, dst_pool, src_block_ids, dst_block_ids, kv_slice, False)
        src_pool = (desc.num_blocks, desc.num_layers, desc.num_kv_heads, desc.block_stride_bytes)
        transfer_id = self._engine.submit(
            peer.region_id, desc.offset_bytes, src_pool, dst_pool.data_ptr(),
            plan.geometry.as_tuple(), desc.head_bytes, plan.slice_args,
            plan.mapping.ctypes.data, plan.mapping.shape[0],
        )  # fmt: skip
        return TransferHandle(self, transfer_id, plan.num_bytes, keepalive=(dst_pool,))

    def poll(self, handle: TransferHandle) -> TransferStatus:
        return native_engine.poll(self._engine, handle)

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        return native_engine.wait(self._engine, handle, timeout_s)

    def stats(self) -> TransferStats:
        return native_engine.stats(self._engine)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.close()
        self._peers.clear()
        for region in self._owned.values():
            region.close()
        self._owned.clear()

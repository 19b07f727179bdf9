"""The `cuda_ipc` transport: GPU instances on one node, KV pools shared by CUDA IPC.

The producer exports its pool's allocation (IPC handle of the cudaMalloc base + the pool's
offset in it) and an interprocess event it records after each prefill step
(`mark_ready`). The consumer opens both once per peer (cached) and pulls block slices on a
dedicated stream of its device: the stream waits on the producer's event, then the
block-slice kernel (or cudaMemcpyBatchAsync, ``method="memcpy_batch"``) reads the peer's
memory directly; no host staging. Status comes from a completion event.

Lifetime: the producer keeps its pool allocated and registered until every transfer that
reads it reached a final status; a consumer cannot open a pool of its own process (CUDA IPC
handles are for other processes).
"""

from __future__ import annotations

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

METHODS = ("kernel", "memcpy_batch")


@dataclass(frozen=True, slots=True)
class IpcPeer:
    """A peer pool opened in this process (what `submit` takes)."""

    descriptor: PoolDescriptor
    region_id: int
    event_id: int


def _cuda_device(device: int | str | torch.device | None) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "the cuda_ipc transport needs a CUDA device, and torch sees none "
            "(torch.cuda.is_available() is False); CPU instances use the shm transport"
        )
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return torch.device(
        "cuda", torch.cuda.current_device() if device.index is None else device.index
    )


class CudaIpcTransport(KVTransport):
    """KV transfer between GPU processes of one node through CUDA IPC.

    Args:
        device: the local GPU (pools and the copy stream live there); default: current.
        method: ``kernel`` (block-slice kernel on SMs) or ``memcpy_batch`` (copy engines).
    """

    name = "cuda_ipc"

    def __init__(self, device: int | str | torch.device | None = None, method: str = "kernel"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.device = _cuda_device(device)
        self.method = method
        self._engine = _native.cuda_module().IpcTransferEngine(self.device.index, method)
        self._events: dict[int, int] = {}  # pool data_ptr -> local event id
        self._peers: dict[tuple, IpcPeer] = {}

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=self.device)

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        if not isinstance(pool, torch.Tensor) or pool.device != self.device:
            raise ValueError(
                f"pool must be a tensor on {self.device} (this transport's device), got "
                f"{getattr(pool, 'device', type(pool).__name__)}"
            )
        handle, offset, region_bytes = self._engine.export_memory(pool.data_ptr())
        event_id, event_handle = self._engine.create_event()
        self._events[pool.data_ptr()] = event_id
        desc = describe_pool(
            pool, transport=self.name, handle=bytes(handle).hex(), offset_bytes=offset,
            region_bytes=region_bytes,
        )  # fmt: skip
        return PoolDescriptor(**{**_fields(desc), "event_handle": bytes(event_handle).hex()})

    def mark_ready(self, pool: torch.Tensor) -> None:
        """Records the pool's event on the current stream: pulls submitted after this call
        (in real time) see every write queued before it."""
        event_id = self._events.get(pool.data_ptr())
        if event_id is None:
            raise ValueError("pool was not registered with this transport")
        self._engine.record_event(event_id, torch.cuda.current_stream(self.device).cuda_stream)

    def open_peer(self, descriptor: PoolDescriptor) -> IpcPeer:
        if descriptor.transport != self.name:
            raise ValueError(
                f"descriptor is for transport {descriptor.transport!r}; this is {self.name!r}"
            )
        peer = self._peers.get(descriptor.key)
        if peer is not None:
            return peer
        try:
            region = self._engine.open_memory(bytes.fromhex(descriptor.handle))
            event = self._engine.open_event(bytes.fromhex(descriptor.event_handle))
        except RuntimeError as exc:  # the CUDA error names the cause
            raise PeerUnavailableError(
                f"cannot open the KV pool of process {descriptor.owner_pid} on GPU "
                f"{descriptor.device_index}: {exc}. Its owner freed the pool or exited, or "
                "it is this very process (IPC handles are for other processes)."
            ) from exc
        peer = IpcPeer(descriptor, region, event)
        self._peers[descriptor.key] = peer
        return peer

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if not isinstance(peer, IpcPeer):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        if dst_pool.device != self.device:
            raise ValueError(f"dst_pool must be on {self.device}, got {dst_pool.device}")
        desc = peer.descriptor
        # check_ids=False: the engine checks the ids (same rules and words) before queueing.
        plan = plan_submit(desc, dst_pool, src_block_ids, dst_block_ids, kv_slice, False)
        src_pool = (desc.num_blocks, desc.num_layers, desc.num_kv_heads, desc.block_stride_bytes)
        transfer_id = self._engine.submit(
            peer.region_id, desc.offset_bytes, src_pool, dst_pool.data_ptr(),
            plan.geometry.as_tuple(), desc.head_bytes, plan.slice_args,
            plan.mapping.ctypes.data, plan.mapping.shape[0], peer.event_id,
        )  # fmt: skip
        return TransferHandle(self, transfer_id, plan.num_bytes, keepalive=(dst_pool,))

    def poll(self, handle: TransferHandle) -> TransferStatus:
        return native_engine.poll(self._engine, handle)

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        return native_engine.wait(self._engine, handle, timeout_s)

    def stats(self) -> TransferStats:
        return native_engine.stats(self._engine)

    def close(self) -> None:
        self._engine.close()
        self._peers.clear()
        self._events.clear()


def _fields(desc: PoolDescriptor) -> dict[str, object]:
    return {name: getattr(desc, name) for name in PoolDescriptor.__slots__}

"""The KV transfer interface: what moves a request's KV blocks from a prefill instance's pool
into a decode instance's pool, and the types every backend shares.

Shape (Mooncake / NIXL, SGLang's KVPoll)::

    producer (prefill)                         consumer (decode)
    pool = transport.allocate_pool(spec)
    desc = transport.register_pool(pool)  ──►  peer = transport.open_peer(desc)   # once, cached
    ... prefill writes blocks ...
    transport.mark_ready(pool)                 (orders later pulls after those writes)
    announce (request, block ids)         ──►  h = transport.submit(peer, pool, src_ids, dst_ids)
                                               h.poll() / h.wait(timeout_s) -> TransferStatus
    free blocks on the acknowledgement    ◄──  ack once h reached SUCCESS

Pull-based, as in DistServe: the consumer submits reads from the producer's pool when it has
room, so the prefill pool is the queue buffer. The announce/ack protocol lives in the
instances; a transport only moves bytes and reports how it went.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer.descriptor import KVSlice, PoolDescriptor


class TransferStatus(enum.IntEnum):
    """Where a transfer stands (values match csrc/common/transfer_registry.h)."""

    PENDING = 0
    """Submitted, queued behind other transfers; nothing copied yet."""
    TRANSFERRING = 1
    """Copy in progress: the destination blocks hold partial data."""
    SUCCESS = 2
    """Final: every byte landed in the destination blocks."""
    FAILED = 3
    """Final: the destination blocks hold no usable data; `TransferHandle.error` says why."""

    @property
    def is_final(self) -> bool:
        return self in (TransferStatus.SUCCESS, TransferStatus.FAILED)


class PeerUnavailableError(RuntimeError):
    """The peer's pool cannot be opened: its owner closed it or exited, or the descriptor
    names memory this process cannot reach."""


@dataclass(slots=True)
class TransferStats:
    """Totals of one transport since it was created."""

    num_submitted: int = 0
    num_succeeded: int = 0
    num_failed: int = 0
    num_in_flight: int = 0
    bytes_succeeded: int = 0
    """Bytes moved by transfers that reached SUCCESS."""
    seconds_succeeded: float = 0.0
    """Sum over succeeded transfers of submit -> SUCCESS seconds (they may overlap)."""

    @property
    def mean_gbps(self) -> float:
        """bytes_succeeded / seconds_succeeded in GB/s (0 when nothing succeeded)."""
        if self.seconds_succeeded <= 0:
            return 0.0
        return self.bytes_succeeded / self.seconds_succeeded / 1e9


@dataclass(slots=True)
class TransferResult:
    """A transfer's outcome as last observed."""

    status: TransferStatus
    error: str = ""
    num_bytes: int = 0
    seconds: float = 0.0
    """Submit -> final status (or -> now while in flight)."""


@dataclass(eq=False, slots=True)
class TransferHandle:
    """One submitted transfer. Keep it (and through it the pools, which it references)
    until it reached a final status: the destination blocks are written until then."""

    transport: KVTransport
    transfer_id: int
    num_bytes: int
    keepalive: tuple = field(default=(), repr=False)
    """Objects the copy reads or writes (pools, mappings): alive while the copy may run."""
    result: TransferResult | None = None
    """Set once the transfer is final."""

    def poll(self) -> TransferStatus:
        """Current status, without blocking."""
        return self.transport.poll(self)

    def wait(self, timeout_s: float) -> TransferStatus:
        """Blocks until a final status or `timeout_s` seconds; returns the status then
        (PENDING or TRANSFERRING on timeout: the transfer goes on)."""
        return self.transport.wait(self, timeout_s)

    @property
    def error(self) -> str:
        return self.result.error if self.result is not None else ""

    @property
    def seconds(self) -> float:
        """Submit -> final status; NaN while in flight."""
        return self.result.seconds if self.result is not None else math.nan


class KVTransport(abc.ABC):
    """A backend that moves KV blocks from a peer's pool into a local pool.

    Contract (every backend, checked by tests/transfer):

    - ``allocate_pool(spec)`` returns a zero-filled pool this transport can export;
      ``register_pool(pool)`` exports it once and returns a small `PoolDescriptor`.
    - ``open_peer(desc)`` maps the peer's pool once per process and caches it by
      ``desc.key``; it raises `PeerUnavailableError` (with the reason) when the pool is gone.
    - ``submit`` checks everything a caller can get wrong (ids in range, dst ids unique,
      slice inside both pools, equal dtype/block_size/head_dim) and raises ValueError before
      anything is copied; otherwise it returns at once with a `TransferHandle`. It never
      silently uses another path than the one `name` reports.
    - ``poll`` never blocks; ``wait(timeout_s)`` returns by the deadline. A failure is a
      FAILED status with a message, not an exception: the engine turns it into a request
      error (and may retry elsewhere).
    - Lifetime: the producer keeps a pool registered until every transfer that reads it
      reached a final status; the consumer keeps the handle (hence the destination pool)
      until then. ``close()`` fails what has not started and releases every mapping.
    """

    name: str
    """The backend in use, reported as is (no silent fallback)."""

    @abc.abstractmethod
    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        """A zero-filled pool ``spec.shape`` that `register_pool` can export."""

    @abc.abstractmethod
    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        """Exports a pool from `allocate_pool`; the descriptor is what peers open."""

    def mark_ready(self, pool: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """Called by the producer after the step that wrote blocks it will announce, so that
        pulls submitted after the announcement see those writes. CPU backends write
        synchronously and need nothing; cuda_ipc records an interprocess event."""

    @abc.abstractmethod
    def open_peer(self, descriptor: PoolDescriptor) -> object:
        """Maps the peer's pool (once; cached) and returns the token `submit` takes."""

    @abc.abstractmethod
    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        """Queues ``dst_pool[dst_block_ids[i]][slice] = peer_pool[src_block_ids[i]][slice]``
        for every i, and returns at once."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferStatus: ...

    @abc.abstractmethod
    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus: ...

    @abc.abstractmethod
    def stats(self) -> TransferStats: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Fails transfers that have not started, releases peer mappings and owned pools."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The `fake` transport: in-process, for tests of the state machines above the transport
(announce / pull / ack, leases, timeouts) without shared memory or GPUs.

Pools are plain tensors registered in a process-wide table; a transfer is PENDING for
`queue_delay_s`, TRANSFERRING for `transfer_delay_s`, then copies with plain torch (the
reference semantics every backend must match: `reference_transfer`) and is SUCCESS, or
FAILED when a failure was injected or the source pool was unregistered meanwhile. Time is
read from `clock` (default `time.monotonic`), so tests can drive it by hand.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer.base import (
    KVTransport,
    PeerUnavailableError,
    TransferHandle,
    TransferResult,
    TransferStats,
    TransferStatus,
)
from distserve_rt.transfer.descriptor import (
    KVSlice,
    PoolDescriptor,
    describe_pool,
    plan_submit,
)

# Pools registered by any FakeTransport of this process: handle -> pool.
_REGISTRY: dict[str, torch.Tensor] = {}
_NEXT_HANDLE = itertools.count(1)


def reference_transfer(
    src_pool: torch.Tensor,  # [src_blocks, src_layers, 2, src_heads, block_size, head_dim]
    dst_pool: torch.Tensor,  # [dst_blocks, dst_layers, 2, dst_heads, block_size, head_dim]
    mapping: np.ndarray,  # [num_pairs, 2] (src block, dst block)
    slice_args: tuple[int, int, int, int, int, int],
) -> None:
    """Plain-torch transfer: for each pair, dst[d, dst layers, :, dst heads] = src[s, ...]."""
    src_l0, dst_l0, num_layers, src_h0, dst_h0, num_heads = slice_args
    for src_block, dst_block in mapping.tolist():
        dst_pool[dst_block, dst_l0 : dst_l0 + num_layers, :, dst_h0 : dst_h0 + num_heads] = (
            src_pool[src_block, src_l0 : src_l0 + num_layers, :, src_h0 : src_h0 + num_heads]
        )


@dataclass(eq=False, slots=True)
class _FakeTransfer:
    descriptor: PoolDescriptor
    dst_pool: torch.Tensor
    mapping: np.ndarray
    slice_args: tuple[int, int, int, int, int, int]
    submit_time: float
    failure: str | None


class FakeTransport(KVTransport):
    """In-process transport with configurable delays and injected failures.

    Args:
        queue_delay_s: seconds a transfer stays PENDING.
        transfer_delay_s: seconds it then stays TRANSFERRING before it completes.
        clock: monotonic time source in seconds.
    """

    name = "fake"

    def __init__(
        self,
        queue_delay_s: float = 0.0,
        transfer_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        delays = {"queue_delay_s": queue_delay_s, "transfer_delay_s": transfer_delay_s}
        for arg, value in delays.items():
            if not value >= 0:
                raise ValueError(f"{arg} must be >= 0 seconds, got {value!r}")
        self.queue_delay_s = float(queue_delay_s)
        self.transfer_delay_s = float(transfer_delay_s)
        self._clock = clock
        self._owned: list[str] = []
        self._pending_failures: list[str] = []
        self._stats = TransferStats()

    def inject_failures(self, count: int = 1, message: str = "injected failure") -> None:
        """The next `count` submits end FAILED with `message` (after their delays)."""
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        self._pending_failures.extend([message] * count)

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=spec.dtype)

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        handle = f"fake-{next(_NEXT_HANDLE)}"
        desc = describe_pool(
            pool, transport=self.name, handle=handle, offset_bytes=0,
            region_bytes=pool.shape[0] * pool.stride(0) * pool.element_size(),
        )  # fmt: skip
        _REGISTRY[handle] = pool
        self._owned.append(handle)
        return desc

    @staticmethod
    def unregister(descriptor: PoolDescriptor) -> None:
        """Makes the pool vanish, as if its owner exited: opens and transfers that have not
        completed fail."""
        _REGISTRY.pop(descriptor.handle, None)

    def open_peer(self, descriptor: PoolDescriptor) -> PoolDescriptor:
        if descriptor.transport != self.name:
            raise ValueError(
                f"descriptor is for transport {descriptor.transport!r}; this is {self.name!r}"
            )
        if descriptor.handle not in _REGISTRY:
            raise PeerUnavailableError(
                f"the fake pool {descriptor.handle} of process {descriptor.owner_pid} is not "
                "registered (its owner closed it)"
            )
        return descriptor

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if not isinstance(peer, PoolDescriptor):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        plan = plan_submit(peer, dst_pool, src_block_ids, dst_block_ids, kv_slice)
        failure = self._pending_failures.pop(0) if self._pending_failures else None
        transfer = _FakeTransfer(
            peer, dst_pool, plan.mapping, plan.slice_args, self._clock(), failure
        )
        self._stats.num_submitted += 1
        self._stats.num_in_flight += 1
        return TransferHandle(self, id(transfer), plan.num_bytes, keepalive=(transfer,))

    def poll(self, handle: TransferHandle) -> TransferStatus:
        if handle.result is not None:
            return handle.result.status
        transfer: _FakeTransfer = handle.keepalive[0]
        elapsed = self._clock() - transfer.submit_time
        if elapsed < self.queue_delay_s:
            return TransferStatus.PENDING
        if elapsed < self.queue_delay_s + self.transfer_delay_s:
            return TransferStatus.TRANSFERRING
        self._complete(handle, transfer, elapsed)
        return handle.result.status  # type: ignore[union-attr]

    def _complete(self, handle: TransferHandle, transfer: _FakeTransfer, elapsed: float) -> None:
        src_pool = _REGISTRY.get(transfer.descriptor.handle)
        error = transfer.failure or ""
        if src_pool is None and not error:
            error = "the source pool was unregistered before the copy: its owner closed it"
        if not error:
            reference_transfer(src_pool, transfer.dst_pool, transfer.mapping, transfer.slice_args)
        status = TransferStatus.FAILED if error else TransferStatus.SUCCESS
        handle.result = TransferResult(status, error, handle.num_bytes, elapsed)
        handle.keepalive = ()
        self._stats.num_in_flight -= 1
        if error:
            self._stats.num_failed += 1
        else:
            self._stats.num_succeeded += 1
            self._stats.bytes_succeeded += handle.num_bytes
            self._stats.seconds_succeeded += elapsed

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        if not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s!r}")
        deadline = self._clock() + timeout_s
        while True:
            status = self.poll(handle)
            now = self._clock()
            if status.is_final or now >= deadline:
                return status
            done_at = handle.keepalive[0].submit_time + self.queue_delay_s + self.transfer_delay_s
            time.sleep(max(0.0, min(deadline, done_at) - now))

    def stats(self) -> TransferStats:
        return TransferStats(**{f: getattr(self._stats, f) for f in TransferStats.__slots__})

    def close(self) -> None:
        for handle in self._owned:
            _REGISTRY.pop(handle, None)
        self._owned.clear()

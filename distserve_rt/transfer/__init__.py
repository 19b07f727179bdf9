"""The KV transfer engine: moves a request's KV blocks from a prefill instance's pool into a
decode instance's pool (see `base.KVTransport` for the contract).

Backends: ``shm`` (CPU processes on one machine, POSIX shared memory), ``cuda_ipc`` (GPUs
on one node, CUDA IPC), ``nixl`` (host pools across machines, NIXL READ over UCX),
``fake`` (in-process, for tests). `create_transport` picks one by name and never
substitutes another.
"""

from __future__ import annotations

from distserve_rt.transfer.base import (
    KVTransport,
    PeerUnavailableError,
    TransferHandle,
    TransferResult,
    TransferStats,
    TransferStatus,
)
from distserve_rt.transfer.descriptor import KVSlice, PoolDescriptor, PoolGeometry
from distserve_rt.transfer.reslice import KVPull, Parallelism, kv_head_range, plan_kv_pulls

SEPARATOR = "+"
"""Joins transports chosen per pair (`per_pair.PerPairTransport`): ``shm+nixl``."""

TRANSPORTS = ("shm", "cuda_ipc", "nixl", "fake")


def create_transport(name: str, **kwargs: object) -> KVTransport:
    """The transport called `name` (one of ``TRANSPORTS``), built with `kwargs`.

    ``cuda_ipc`` without a GPU or without the CUDA module raises RuntimeError saying why;
    there is no fallback to another backend.
    """
    if SEPARATOR in name:  # per-pair: e.g. "shm+nixl" (transfer/per_pair.py)
        from distserve_rt.transfer.per_pair import PerPairTransport

        return PerPairTransport([create_transport(part) for part in name.split(SEPARATOR)])
    if name == "shm":
        from distserve_rt.transfer.shm import ShmTransport

        return ShmTransport(**kwargs)  # type: ignore[arg-type]
    if name == "cuda_ipc":
        from distserve_rt.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(**kwargs)  # type: ignore[arg-type]
    if name == "nixl":
        from distserve_rt.transfer.nixl import NixlTransport

        return NixlTransport(**kwargs)  # type: ignore[arg-type]
    if name == "fake":
        from distserve_rt.transfer.fake import FakeTransport

        return FakeTransport(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}")


__all__ = [
    "TRANSPORTS",
    "KVPull",
    "KVSlice",
    "KVTransport",
    "Parallelism",
    "PeerUnavailableError",
    "PoolDescriptor",
    "PoolGeometry",
    "TransferHandle",
    "TransferResult",
    "TransferStats",
    "TransferStatus",
    "create_transport",
    "kv_head_range",
    "plan_kv_pulls",
]

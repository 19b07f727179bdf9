"""Several transports over one pool, each peer read through the one chosen for its pair.

On a cluster an instance may have peers on its own node (read through ``shm``) and peers on
other nodes (read through ``nixl``): 2 prefill + 2 decode instances on 2 nodes, say. The
transport is chosen per pair, not per instance:

- the producer registers its pool with every transport it may be read through;
  `register_pool` returns a `PoolDescriptorSet` (one descriptor per transport);
- whoever knows where both ends run (the controller) picks, for each pair, the one
  descriptor of the chosen transport (`select_descriptor`) and sends it to the consumer;
- the consumer's `open_peer` reads that descriptor's ``transport`` and opens it with that
  backend; every later `submit` to the peer goes through it. Its `TransferHandle` is the
  inner backend's, so each transfer is labelled with the transport that moved it.

Since an instance may span nodes (PP stages on different nodes), the ray launcher goes one
step finer, per (prefill rank, decode rank) pair: `RankDescriptors` gives each decode rank
its own descriptor of each prefill rank it reads (DistServe's "aligned" placement, each
node holding the same layers of both instances, then reads every rank pair over ``shm``).

Never a fallback: a descriptor of a transport this object does not hold is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer.base import KVTransport, TransferHandle, TransferStats, TransferStatus
from distserve_rt.transfer.descriptor import KVSlice, PoolDescriptor


@dataclass(frozen=True, slots=True)
class PoolDescriptorSet:
    """One pool exported through several transports (what a per-pair producer announces)."""

    descriptors: tuple[PoolDescriptor, ...]

    def to_bytes(self) -> bytes:
        raw = {"pool_descriptors": [asdict(d) for d in self.descriptors]}
        return json.dumps(raw, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> PoolDescriptorSet:
        """A set, or a plain `PoolDescriptor`'s bytes as a set of one."""
        data = json.loads(raw)
        if "pool_descriptors" not in data:
            return cls((PoolDescriptor(**data),))
        return cls(tuple(PoolDescriptor(**d) for d in data["pool_descriptors"]))


def select_descriptor(raw: bytes, transport: str) -> bytes:
    """The `PoolDescriptor` bytes of `transport` in a producer's announced `raw` bytes (a
    set or a single descriptor); ValueError when the producer did not export through it."""
    found = PoolDescriptorSet.from_bytes(raw).descriptors
    for d in found:
        if d.transport == transport:
            return d.to_bytes()
    raise ValueError(
        f"transport {transport!r} chosen for a pair, but the producer's pool is exported "
        f"through {[d.transport for d in found]} only"
    )


@dataclass(frozen=True, slots=True)
class RankDescriptors:
    """One prefill instance's pools as each rank of one decode instance reads them.

    ``by_rank[decode rank][prefill rank]`` (ranks ``pp_rank * tp + tp_rank``) is the
    `PoolDescriptor` bytes of the transport chosen for that rank pair, or None where the
    pair moves no KV (their layers do not overlap): that pool is not opened by that rank.
    """

    by_rank: tuple[tuple[bytes | None, ...], ...]

    def for_rank(self, rank: int) -> list[bytes | None]:
        if not 0 <= rank < len(self.by_rank):
            raise ValueError(
                f"decode rank {rank} has no descriptors: chosen for {len(self.by_rank)} ranks"
            )
        return list(self.by_rank[rank])


def descriptors_for_rank(raws: list[bytes] | RankDescriptors, rank: int) -> list[bytes | None]:
    """What decode rank `rank` opens of one prefill instance: `raws` as they are (one
    transport for every rank pair), or its row of a `RankDescriptors`."""
    return raws.for_rank(rank) if isinstance(raws, RankDescriptors) else list(raws)


def select_rank_descriptors(
    raws: list[bytes], transports: Sequence[Sequence[str | None]]
) -> RankDescriptors:
    """`transports[decode rank][prefill rank]` (None: the pair moves no KV) applied to
    the prefill ranks' announced `raws`; ValueError as `select_descriptor`."""
    for row in transports:
        if len(row) != len(raws):
            raise ValueError(
                f"transports chosen for {len(row)} prefill ranks, the prefill instance "
                f"announced {len(raws)}"
            )
    return RankDescriptors(
        tuple(
            tuple(None if t is None else select_descriptor(raws[q], t) for q, t in enumerate(row))
            for row in transports
        )
    )


@dataclass(frozen=True, slots=True)
class PairPeer:
    transport: str
    inner: object


class PerPairTransport(KVTransport):
    """`transports` over the same pools; the first allocates them (the others register
    memory they did not allocate: ``nixl`` registers any host tensor)."""

    def __init__(self, transports: Sequence[KVTransport]) -> None:
        if len(transports) < 2:
            raise ValueError(f"a per-pair transport needs 2+ transports, got {len(transports)}")
        self.transports = {t.name: t for t in transports}
        self.name = "+".join(self.transports)
        self._first = transports[0]

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return self._first.allocate_pool(spec)

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptorSet:  # type: ignore[override]
        return PoolDescriptorSet(tuple(t.register_pool(pool) for t in self.transports.values()))

    def mark_ready(self, pool: torch.Tensor) -> None:
        for t in self.transports.values():
            t.mark_ready(pool)

    def open_peer(self, descriptor: PoolDescriptor) -> PairPeer:
        transport = self.transports.get(descriptor.transport)
        if transport is None:
            raise ValueError(
                f"a peer pool exported through {descriptor.transport!r}; this per-pair "
                f"transport reads through {list(self.transports)} only"
            )
        return PairPeer(descriptor.transport, transport.open_peer(descriptor))

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if not isinstance(peer, PairPeer):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        inner = self.transports[peer.transport]
        return inner.submit(peer.inner, dst_pool, src_block_ids, dst_block_ids, kv_slice)

    def poll(self, handle: TransferHandle) -> TransferStatus:
        return handle.transport.poll(handle)

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        return handle.transport.wait(handle, timeout_s)

    def stats(self) -> TransferStats:
        total = TransferStats()
        for t in self.transports.values():
            s = t.stats()
            total.num_submitted += s.num_submitted
            total.num_succeeded += s.num_succeeded
            total.num_failed += s.num_failed
            total.num_in_flight += s.num_in_flight
            total.bytes_succeeded += s.bytes_succeeded
            total.seconds_succeeded += s.seconds_succeeded
        return total

    def stats_by_transport(self) -> dict[str, TransferStats]:
        """Each backend's own totals (what moved through which path)."""
        return {name: t.stats() for name, t in self.transports.items()}

    def close(self) -> None:
        # Reverse order: the others unregister memory before its allocator frees it.
        for t in reversed(list(self.transports.values())):
            t.close()

"""Where the KV migration happens on the decode side: pulls of announced KV blocks from a
prefill instance's pool into this instance's pool, through a `KVTransport`.

Pull-based, as in DistServe: the decode instance calls `KVPuller.start` only once its
scheduler has allocated the destination blocks (it has room), so the prefill pool is the
queue buffer. `poll` never blocks; each finished pull is reported once with its bytes and
seconds. The prefill side frees its blocks only after the decode side says it is done
with them (`messages.MigrationDone` -> `messages.ReleaseKV`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt.core.request import Request
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.transfer import (
    KVTransport,
    PoolDescriptor,
    TransferHandle,
    TransferStatus,
)


class PullOutcome(enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    """The transport reported FAILED, or the KV digest did not match (`error` says)."""


@dataclass(slots=True)
class Pull:
    request: Request
    migration: Migrate
    handle: TransferHandle
    dst_block_ids: np.ndarray
    """int32 [num_blocks]: this pool's blocks being written."""
    start_time: float


@dataclass(slots=True)
class FinishedPull:
    pull: Pull
    outcome: PullOutcome
    end_time: float
    error: str | None = None


def kv_digest(pool: torch.Tensor, block_ids: Sequence[int] | np.ndarray) -> str:
    """Hash of the bytes of whole blocks (debug: the pull must reproduce them exactly).

    `pool`: ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``.
    """
    ids = torch.as_tensor(np.asarray(block_ids, dtype=np.int64))
    blocks = pool.index_select(0, ids.to(pool.device)).contiguous().cpu()
    return hashlib.blake2b(blocks.view(torch.uint8).numpy().tobytes()).hexdigest()


class KVPuller:
    """The decode instance's in-flight pulls.

    Args:
        transport: the instance's transport (its `open_peer` maps prefill pools).
        pool: this instance's KV pool, the destination.
        verify: compare `kv_digest` of the destination blocks with the announced one.
    """

    def __init__(self, transport: KVTransport, pool: torch.Tensor, verify: bool) -> None:
        self.transport = transport
        self.pool = pool
        self.verify = verify
        self.num_verified = 0
        self._peers: dict[int, object] = {}
        self.pulls: dict[str, Pull] = {}

    def open_peers(self, descriptors: dict[int, bytes]) -> None:
        """Maps each prefill instance's pool once (raises PeerUnavailableError)."""
        for index, raw in descriptors.items():
            self._peers[index] = self.transport.open_peer(PoolDescriptor.from_bytes(raw))

    def start(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> None:
        """Submits the pull of `migration`'s blocks into `dst_block_ids` (same count)."""
        if len(dst_block_ids) != len(migration.block_ids):
            raise ValueError(
                f"request {request.request_id!r}: {len(migration.block_ids)} source blocks "
                f"but {len(dst_block_ids)} destination blocks"
            )
        peer = self._peers.get(migration.prefill_index)
        if peer is None:
            raise ValueError(f"no pool descriptor for prefill-{migration.prefill_index}")
        handle = self.transport.submit(peer, self.pool, migration.block_ids, dst_block_ids)
        self.pulls[request.request_id] = Pull(request, migration, handle, dst_block_ids, now)

    def poll(self, now: float) -> list[FinishedPull]:
        """The pulls that reached a final status since the last call (non-blocking)."""
        done: list[FinishedPull] = []
        for request_id, pull in list(self.pulls.items()):
            status = pull.handle.poll()
            if not status.is_final:
                continue
            del self.pulls[request_id]
            if status is TransferStatus.FAILED:
                error = f"KV transfer failed: {pull.handle.error}"
                done.append(FinishedPull(pull, PullOutcome.FAILED, now, error))
                continue
            done.append(self._check_digest(pull, now))
        return done

    def _check_digest(self, pull: Pull, now: float) -> FinishedPull:
        expected = pull.migration.kv_digest
        if not self.verify or expected is None:
            return FinishedPull(pull, PullOutcome.SUCCESS, now)
        got = kv_digest(self.pool, pull.dst_block_ids)
        if got != expected:
            error = f"KV arrived corrupted (digest {got[:12]} != announced {expected[:12]})"
            return FinishedPull(pull, PullOutcome.FAILED, now, error)
        self.num_verified += 1
        return FinishedPull(pull, PullOutcome.SUCCESS, now)


def generator_state(generator: torch.Generator) -> bytes:
    """A seeded request's random stream as bytes (it migrates with the KV, so the decode
    instance draws what the colocated engine would draw next)."""
    return generator.get_state().numpy().tobytes()


def restore_generator(state: bytes, device: torch.device) -> torch.Generator:
    """The generator `generator_state` saved, on `device` (where the decode logits are)."""
    generator = torch.Generator(device=device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator

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
from distserve_rt.distributed.parallel_state import partition_layers
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.transfer import (
    KVTransport,
    Parallelism,
    PoolDescriptor,
    TransferHandle,
    TransferStatus,
    kv_head_range,
    plan_kv_pulls,
)


class PullOutcome(enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    """The transport reported FAILED, or the KV digest did not match (`error` says)."""


@dataclass(slots=True)
class Pull:
    request: Request
    migration: Migrate
    handles: list[TransferHandle]
    """One per source rank slice (`plan_kv_pulls`); one whole-block copy at equal
    parallelism."""
    dst_block_ids: np.ndarray
    """int32 [num_blocks]: this pool's blocks being written."""
    start_time: float


@dataclass(slots=True)
class FinishedPull:
    pull: Pull
    outcome: PullOutcome
    end_time: float
    error: str | None = None
    num_bytes: int = 0


def kv_digest(pool: torch.Tensor, block_ids: Sequence[int] | np.ndarray) -> str:
    """Hash of the bytes of whole blocks (debug: the pull must reproduce them exactly).

    `pool`: ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``.
    """
    ids = torch.as_tensor(np.asarray(block_ids, dtype=np.int64))
    blocks = pool.index_select(0, ids.to(pool.device)).contiguous().cpu()
    return hashlib.blake2b(blocks.view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class PullGeometry:
    """Who pulls what: the model's KV shape and both instances' parallelism, and which rank
    of the decode instance this is (its pool holds that rank's layers and heads)."""

    num_layers: int
    num_kv_heads: int
    src: Parallelism
    dst: Parallelism
    dst_tp_rank: int = 0
    dst_pp_rank: int = 0

    def __post_init__(self) -> None:
        # A decode instance checks the pair at start-up, not at its first pull.
        for side, par in (("prefill", self.src), ("decode", self.dst)):
            try:
                kv_head_range(self.num_kv_heads, par.tp_size, 0)
                partition_layers(self.num_layers, par.pp_size)
            except ValueError as exc:
                raise ValueError(
                    f"{side} tp={par.tp_size} pp={par.pp_size} does not fit a model with "
                    f"{self.num_kv_heads} KV heads and {self.num_layers} layers: {exc}"
                ) from None


SUBMITTED_DRAIN_TIMEOUT_S = 60.0
"""How long a failed multi-slice submit waits for the slices it already started."""


def submit_pulls(
    transport: KVTransport,
    peers: Sequence[object],
    geometry: PullGeometry,
    pool: torch.Tensor,
    src_block_ids: Sequence[int],
    dst_block_ids: np.ndarray,
) -> list[TransferHandle]:
    """Submits the pulls that fill this rank's part of `dst_block_ids` (`plan_kv_pulls`).

    `peers`: the prefill instance's opened pools, rank order (``pp_rank * tp + tp_rank``).
    At equal parallelism every rank copies whole blocks from the same rank.
    """
    g = geometry
    if g.src == g.dst:
        peer = peers[g.dst_pp_rank * g.src.tp_size + g.dst_tp_rank]
        return [transport.submit(peer, pool, src_block_ids, dst_block_ids)]
    plans = plan_kv_pulls(g.num_layers, g.num_kv_heads, g.src, g.dst, g.dst_tp_rank, g.dst_pp_rank)
    handles: list[TransferHandle] = []
    try:
        for p in plans:
            peer = peers[p.src_pp_rank * g.src.tp_size + p.src_tp_rank]
            handles.append(transport.submit(peer, pool, src_block_ids, dst_block_ids, p.kv_slice))
    except Exception:
        # The caller fails the migration and frees `dst_block_ids`: the slices already
        # submitted must not write into them afterwards.
        for handle in handles:
            handle.wait(SUBMITTED_DRAIN_TIMEOUT_S)
        raise
    return handles


def pull_error(handles: Sequence[TransferHandle]) -> str | None:
    """None when every handle succeeded, else the first failure's message."""
    for handle in handles:
        if handle.poll() is TransferStatus.FAILED:
            return f"KV transfer failed: {handle.error}"
    return None


class KVPuller:
    """The in-flight pulls of a decode instance whose pool is in its own process (TP = PP =
    1; `rank_kv.RankPuller` drives the ranks of a TP x PP instance).

    Args:
        transport: the instance's transport (its `open_peer` maps prefill pools).
        pool: this instance's KV pool, the destination.
        verify: compare `kv_digest` of the destination blocks with the announced one.
        geometry: the prefill instances' parallelism (this instance is TP = PP = 1).
        min_pull_s: `DisaggConfig.debug_min_pull_s` (a pull is done no sooner).
    """

    POLL_INTERVAL_S = 0.0002
    """Loop wait while pulls are in flight: a pull of a few blocks takes microseconds to
    milliseconds, and a poll is local."""

    def __init__(
        self,
        transport: KVTransport,
        pool: torch.Tensor,
        verify: bool,
        geometry: PullGeometry,
        min_pull_s: float = 0.0,
    ) -> None:
        self.transport = transport
        self.min_pull_s = min_pull_s
        self.pool = pool
        self.verify = verify
        self.geometry = geometry
        self.num_verified = 0
        self._peers: dict[int, list[object]] = {}
        self.pulls: dict[str, Pull] = {}
        # Per migration (one may take several transport transfers, one per source rank).
        self._num_succeeded = self._num_failed = self._bytes = 0
        self._seconds = 0.0

    def open_peers(self, descriptors: dict[int, list[bytes]]) -> None:
        """Maps each prefill instance's pools (one per rank) once (raises
        PeerUnavailableError)."""
        for index, raws in descriptors.items():
            self._peers[index] = [
                self.transport.open_peer(PoolDescriptor.from_bytes(raw)) for raw in raws
            ]

    def start(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> None:
        """Submits the pull of `migration`'s blocks into `dst_block_ids` (same count)."""
        check_block_counts(request, migration, dst_block_ids)
        peers = self._peers.get(migration.prefill_index)
        if peers is None:
            raise ValueError(f"no pool descriptor for prefill-{migration.prefill_index}")
        handles = submit_pulls(
            self.transport, peers, self.geometry, self.pool, migration.block_ids, dst_block_ids
        )
        self.pulls[request.request_id] = Pull(request, migration, handles, dst_block_ids, now)

    def poll(self, now: float) -> list[FinishedPull]:
        """The pulls that reached a final status since the last call (non-blocking)."""
        done: list[FinishedPull] = []
        for request_id, pull in list(self.pulls.items()):
            if not all(h.poll().is_final for h in pull.handles):
                continue
            if now - pull.start_time < self.min_pull_s:
                continue  # debug_min_pull_s: a slow transfer, for tests
            del self.pulls[request_id]
            error = pull_error(pull.handles)
            finished = (
                FinishedPull(pull, PullOutcome.FAILED, now, error)
                if error is not None
                else self._check_digest(pull, now)
            )
            if finished.outcome is PullOutcome.SUCCESS:
                finished.num_bytes = sum(h.num_bytes for h in pull.handles)
                self._num_succeeded += 1
                self._bytes += finished.num_bytes
                self._seconds += max(h.seconds for h in pull.handles)
            else:
                self._num_failed += 1
            done.append(finished)
        return done

    def totals(self) -> tuple[int, int, int, float]:
        """(succeeded, failed, bytes, seconds) of this instance's migrations."""
        return self._num_succeeded, self._num_failed, self._bytes, self._seconds

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


def check_block_counts(request: Request, migration: Migrate, dst_block_ids: np.ndarray) -> None:
    if len(dst_block_ids) != len(migration.block_ids):
        raise ValueError(
            f"request {request.request_id!r}: {len(migration.block_ids)} source blocks "
            f"but {len(dst_block_ids)} destination blocks"
        )

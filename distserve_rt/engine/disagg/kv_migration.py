"""Where the KV migration happens on the decode side: pulls of announced KV blocks from a
prefill instance's pool into this instance's pool, through a `KVTransport`.

Pull-based, as in DistServe: the decode instance calls `Puller.start` only once its
scheduler has allocated the destination blocks (it has room), so the prefill pool is the
queue buffer (`puller.Puller` states the contract `KVPuller` implements). The prefill side
frees its blocks only after the decode side says it is done with them
(`messages.MigrationDone` -> `messages.ReleaseKV`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt.core.request import Request
from distserve_rt.distributed.parallel_state import partition_layers
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import (
    PULL_TIMEOUT_S,
    FinishedPull,
    Pull,
    Puller,
    PullOutcome,
)
from distserve_rt.transfer import (
    KVTransport,
    Parallelism,
    PoolDescriptor,
    TransferHandle,
    TransferStatus,
    kv_head_range,
    plan_kv_pulls,
)
from distserve_rt.transfer.per_pair import RankDescriptors, descriptors_for_rank


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

    `peers`: the prefill instance's opened pools, rank order (``pp_rank * tp + tp_rank``);
    None for a rank this one was told moves it no KV (`per_pair.RankDescriptors`): a pull
    that needs it is refused (ValueError), never sent another way.
    At equal parallelism every rank copies whole blocks from the same rank.
    """
    g = geometry
    if g.src == g.dst:
        peer = _peer(peers, g.dst_pp_rank * g.src.tp_size + g.dst_tp_rank)
        return [transport.submit(peer, pool, src_block_ids, dst_block_ids)]
    plans = plan_kv_pulls(g.num_layers, g.num_kv_heads, g.src, g.dst, g.dst_tp_rank, g.dst_pp_rank)
    handles: list[TransferHandle] = []
    try:
        for p in plans:
            peer = _peer(peers, p.src_pp_rank * g.src.tp_size + p.src_tp_rank)
            handles.append(transport.submit(peer, pool, src_block_ids, dst_block_ids, p.kv_slice))
    except Exception:
        # The caller fails the migration and frees `dst_block_ids`: the slices already
        # submitted must not write into them afterwards.
        for handle in handles:
            handle.wait(SUBMITTED_DRAIN_TIMEOUT_S)
        raise
    return handles


def _peer(peers: Sequence[object], rank: int) -> object:
    peer = peers[rank]
    if peer is None:
        raise ValueError(
            f"prefill rank {rank}'s pool was not opened here: the placement chose no "
            f"transport for this rank pair (their layers do not overlap)"
        )
    return peer


def open_peer_list(transport: KVTransport, raws: list[bytes | None]) -> list[object]:
    """Each prefill rank's pool opened through `transport` (None stays None: not read)."""
    return [
        None if raw is None else transport.open_peer(PoolDescriptor.from_bytes(raw)) for raw in raws
    ]


def pull_error(handles: Sequence[TransferHandle]) -> str | None:
    """None when every handle succeeded, else the first failure's message."""
    for handle in handles:
        if handle.poll() is TransferStatus.FAILED:
            return f"KV transfer failed: {handle.error}"
    return None


class KVPuller(Puller):
    """The pulls of a decode instance whose pool is in its own process (TP = PP = 1;
    `rank_kv.RankPuller` drives the ranks of a TP x PP instance): it submits each
    migration's slices to its transport and polls their handles.

    Args:
        transport: the instance's transport (its `open_peer` maps prefill pools).
        pool: this instance's KV pool, the destination.
        geometry: the prefill instances' parallelism (this instance is TP = PP = 1).
        timeout_s: see `Puller`.
    """

    POLL_INTERVAL_S = 0.0002
    """A pull of a few blocks takes microseconds to milliseconds, and a poll is local."""

    def __init__(
        self,
        transport: KVTransport,
        pool: torch.Tensor,
        geometry: PullGeometry,
        timeout_s: float = PULL_TIMEOUT_S,
    ) -> None:
        super().__init__(transport.name, timeout_s)
        self.transport = transport
        self.pool = pool
        self.geometry = geometry
        self._peers: dict[int, list[object]] = {}

    def open_peers(self, descriptors: dict[int, list[bytes] | RankDescriptors]) -> None:
        for index, raws in descriptors.items():
            self._peers[index] = open_peer_list(self.transport, descriptors_for_rank(raws, 0))

    def _submit(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> Pull:
        peers = self._peers.get(migration.prefill_index)
        if peers is None:
            raise ValueError(f"no pool descriptor for prefill-{migration.prefill_index}")
        handles = submit_pulls(
            self.transport, peers, self.geometry, self.pool, migration.block_ids, dst_block_ids
        )
        return Pull(request, migration, handles, dst_block_ids, now)

    def _collect_final(self, now: float) -> list[FinishedPull]:
        done: list[FinishedPull] = []
        for pull in self.pulls.values():
            if not all(h.poll().is_final for h in pull.handles):
                continue
            error = pull_error(pull.handles)
            if error is not None:
                done.append(FinishedPull(pull, PullOutcome.FAILED, now, error))
                continue
            num_bytes = sum(h.num_bytes for h in pull.handles)
            seconds = max(h.seconds for h in pull.handles)
            done.append(FinishedPull(pull, PullOutcome.SUCCESS, now, None, num_bytes, seconds))
        return done

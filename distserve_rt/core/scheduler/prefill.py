"""The prefill instance's policy (DistServe): FCFS batches of whole prompts up to L_m tokens;
a finished prefill keeps its KV blocks until a decode instance has pulled them.

Per step: waiting requests are admitted in arrival order while their prompts fit the token
budget ``max_num_batched_tokens`` (the paper's L_m, the batch size that saturates the
device) and the KV pool has room for them (above the watermark). A prompt longer than L_m
runs in a batch of its own (prompts are never split). Every admitted request produces its
first token in that step; the instance then calls `start_migration` and the request waits,
"awaiting migration", holding its blocks, until the decode side acknowledges the pull
(`release_migration`).

Back-pressure: KV nobody pulled stays in the pool, so admission stops (AllocStatus.LATER)
once the pool is full of it; waiting requests then queue here instead of piling KV up.
Leases: `expired_leases(now, timeout_s)` names the requests whose KV has waited longer than
the lease; the instance asks the controller to revoke them (the decode side must confirm it
has not started pulling before the blocks may be reused, see engine/disagg/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt.core.block_manager import AllocStatus, BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler.base import SchedulerBase
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    SchedulerConfig,
    SchedulerOutput,
    StepUpdate,
)
from distserve_rt.logprobs import Logprob


@dataclass(slots=True)
class MigrationLease:
    """A finished prefill whose KV waits for a decode instance to pull it."""

    request: Request
    start_time: float
    """When the KV became ready (the lease starts), seconds."""
    expired: bool = False
    """Reported by `expired_leases` once; the blocks stay held until released."""


class PrefillScheduler(SchedulerBase):
    """FCFS prefill-only batching with a token budget; KV held until migrated."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        super().__init__(config, block_manager)
        # Insertion order is lease-start order: expiry scans stop at the first young one.
        self.awaiting_migration: dict[str, MigrationLease] = {}

    def schedule(self, now: float) -> SchedulerOutput:
        finished = self._begin_step()
        prefills = self._admit(now)
        return self._build_output(prefills, [], np.zeros(0, np.int64), [], finished)

    def _admit(self, now: float) -> list[ScheduledPrefill]:
        budget = self.config.max_num_batched_tokens
        num_seqs = len(self.awaiting_migration) + len(self.prefilling)
        prefills: list[ScheduledPrefill] = []
        while self.waiting and num_seqs < self.config.max_num_seqs:
            request = self.waiting[0]
            # A retried request prefills its already generated tokens too.
            num_new_tokens = request.num_tokens
            if prefills and num_new_tokens > budget:
                break
            status = self._try_admit(request, now)
            if status is AllocStatus.LATER:
                break  # back-pressure: the pool is full (of KV awaiting migration)
            self.waiting.popleft()
            if status is AllocStatus.NEVER:
                continue
            # Less than num_tokens when the prompt's first blocks were in the prefix cache.
            num_new_tokens = request.num_uncomputed_tokens
            prefills.append(self._schedule_chunk(request, num_new_tokens))
            self.prefilling.append(request)
            budget -= num_new_tokens
            num_seqs += 1
        return prefills

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Sequence[int],
        logprobs: Sequence[dict[int, Logprob] | None] | None,
        now: float,
    ) -> StepUpdate:
        """The first tokens: a request that did not stop now awaits migration (its lease
        starts at `now`)."""
        update = super().update_from_output(output, sampled_token_ids, logprobs, now)
        for request in update.updated:
            if not request.is_finished:
                self.start_migration(request, now)
        return update

    # ---- migration ------------------------------------------------------------------------

    def start_migration(self, request: Request, now: float) -> None:
        """The request's prefill produced its first token and did not stop: its KV now waits
        for a decode instance (the lease starts at `now`)."""
        self.prefilling.remove(request)
        self.awaiting_migration[request.request_id] = MigrationLease(request, now)

    def release_migration(self, request_id: str) -> Request | None:
        """The decode side pulled the KV (or gave it up): frees the blocks and forgets the
        request here. Returns it, or None when it is not awaiting migration."""
        lease = self.awaiting_migration.pop(request_id, None)
        if lease is None:
            return None
        self._live.pop(request_id)
        self.block_manager.free(lease.request.seq_id)
        return lease.request

    def expired_leases(self, now: float, timeout_s: float) -> list[Request]:
        """Requests whose KV has waited more than `timeout_s` seconds, each reported once."""
        expired = []
        for lease in self.awaiting_migration.values():
            if now - lease.start_time < timeout_s:
                break
            if not lease.expired:
                lease.expired = True
                expired.append(lease.request)
        return expired

    def block_ids(self, request: Request) -> np.ndarray:
        """int32 [num_blocks]: the blocks holding the request's KV (what decode pulls)."""
        return self.block_manager.block_table(request.seq_id)

    @property
    def num_awaiting_migration(self) -> int:
        return len(self.awaiting_migration)

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.awaiting_migration)

    def finish_request(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.request_id in self.awaiting_migration:
            # Owned by the announce/ack protocol: only release_migration frees it.
            raise ValueError(
                f"request {request.request_id!r} awaits migration; release it with "
                "release_migration once the decode side has answered"
            )
        super().finish_request(request, status, now)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        """Aborts a waiting or prefilling request; one awaiting migration is not touched
        (the decode side may be reading its blocks) and None is returned."""
        if request_id in self.awaiting_migration:
            return None
        return super().abort_request(request_id, now)

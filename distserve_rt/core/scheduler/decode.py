"""The decode instance's policy (DistServe): continuous batching of migrated requests.

A request arrives from a prefill instance with its first token known and its prompt's KV in
the prefill instance's pool. It queues in ``pending`` (no blocks) until this pool has room
for its prompt's blocks plus the watermark; `admit_migrations` then allocates them and the
instance pulls the KV into them (``pulling``); `complete_migration` moves it to ``running``,
where every step decodes one token for every running request.

When blocks run out mid-decode, the most recently arrived running request is preempted by
recompute *here*: its KV is dropped and its next step is a local prefill of prompt +
generated tokens (this instance holds the whole model stage, so it need not go back to a
prefill instance). Such recompute prefills run before any decode step (vLLM's prefill-first
order), and no new migration is admitted while one waits, so a short pool does not thrash.
The same path prefills requests the controller sends here directly (`add_request`:
conditional disaggregation, a short or mostly cached prompt).

With prefix caching on, this pool is a prefix cache too: a migration's leading blocks
already cached here (an earlier turn of the same conversation decoded here) are shared at
admission (`reused_tokens`) and only the rest is pulled; once the pull lands, its full
blocks are registered, and the blocks decode steps fill are registered as they fill.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from distserve_rt.core.block_manager import AllocStatus, BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler.base import SchedulerBase
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    SchedulerConfig,
    SchedulerOutput,
)


class DecodeScheduler(SchedulerBase):
    """Continuous batching over KV pulled from prefill instances."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        super().__init__(config, block_manager)
        self.pending: deque[Request] = deque()
        """Announced migrations waiting for room, FCFS (no blocks yet)."""
        self.pulling: dict[str, Request] = {}
        """Blocks allocated, KV transfer in flight."""
        self.reused_tokens: dict[str, int] = {}
        """Of each pulling request's KV, the leading tokens found in this pool's prefix cache
        (a multiple of block_size; 0 with caching off): the pull skips their blocks."""

    def add_migrated(self, request: Request) -> None:
        """Queues an announced request: ``token_ids`` = prompt + generated tokens (the last
        one sampled by prefill), ``num_computed_tokens`` = the tokens whose KV is pulled."""
        if request.request_id in self._live:
            raise ValueError(f"request_id {request.request_id!r} is already live")
        if request.num_computed_tokens != request.num_tokens - 1:
            raise ValueError(
                f"a migrated request carries KV for all tokens but its last: "
                f"num_computed_tokens={request.num_computed_tokens}, "
                f"num_tokens={request.num_tokens}"
            )
        self._live[request.request_id] = request
        self.pending.append(request)

    def admit_migrations(self, now: float) -> list[Request]:
        """Allocates blocks for pending migrations while they fit (FCFS); returns the
        requests whose KV the instance must pull now."""
        admitted: list[Request] = []
        if self.waiting:
            return admitted  # recompute prefills first: the pool is short already
        num_seqs = len(self.running) - self._num_stale_running + len(self.pulling)
        bm = self.block_manager
        while self.pending and num_seqs < self.config.max_num_seqs:
            request = self.pending[0]
            token_ids = None
            if bm.enable_prefix_caching:
                token_ids = np.array(request.token_ids[: request.num_computed_tokens], np.int64)
            status = bm.can_allocate(request.num_computed_tokens, token_ids)
            if status is AllocStatus.LATER:
                break
            self.pending.popleft()
            if status is AllocStatus.NEVER:
                self._live.pop(request.request_id)
                self._reject(request, _never_fits(request, bm), now)
                continue
            # At most num_computed_tokens - 1 cached: the block of the last pulled token is
            # always pulled (the block manager keeps the last token's block a request's own).
            self.reused_tokens[request.request_id] = bm.allocate(
                request.seq_id, request.num_computed_tokens, token_ids
            )
            request.status = RequestStatus.RUNNING
            self.pulling[request.request_id] = request
            admitted.append(request)
            num_seqs += 1
        return admitted

    def complete_migration(self, request: Request) -> None:
        """The KV landed: the request decodes from the next step on; its pulled full blocks
        join the prefix cache (after the pull, never before: a shared block must hold KV)."""
        del self.pulling[request.request_id]
        start = self.reused_tokens.pop(request.request_id)
        if self.block_manager.enable_prefix_caching:
            end = request.num_computed_tokens
            self.block_manager.cache_blocks(
                request.seq_id, request.token_ids[start:end], end, start
            )
        self.running.append(request)

    def drop_migration(self, request: Request, status: RequestStatus, now: float) -> None:
        """Ends a pending or pulling request (pull failed, aborted after the pull, revoked);
        frees its blocks. The caller reports it; it is not in ``SchedulerOutput.finished``."""
        if self.pulling.pop(request.request_id, None) is not None:
            self.reused_tokens.pop(request.request_id)
            self.block_manager.free(request.seq_id)
        else:
            self.pending.remove(request)
        self._live.pop(request.request_id)
        request.finish(status, now)

    def schedule(self, now: float) -> SchedulerOutput:
        finished = self._begin_step()
        prefills = self._schedule_recomputes(now)
        if prefills:
            return self._build_output(prefills, [], np.zeros(0, np.int64), [], finished)
        preempted: list[Request] = []
        decodes, slots = self._reserve_decodes(now, preempted)
        return self._build_output([], decodes, slots, preempted, finished)

    def _schedule_recomputes(self, now: float) -> list[ScheduledPrefill]:
        budget = self.config.max_num_batched_tokens
        num_seqs = len(self.running) + len(self.pulling)
        prefills: list[ScheduledPrefill] = []
        while self.waiting and num_seqs < self.config.max_num_seqs:
            request = self.waiting[0]
            if prefills and request.num_tokens > budget:
                break
            status = self._try_admit(request, now)
            if status is AllocStatus.LATER:
                break
            self.waiting.popleft()
            if status is AllocStatus.NEVER:
                continue
            # Less than num_tokens when its leading blocks were in the prefix cache.
            num_new_tokens = request.num_uncomputed_tokens
            prefills.append(self._schedule_chunk(request, num_new_tokens))
            self.running.append(request)
            budget -= num_new_tokens
            num_seqs += 1
        return prefills

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.pending)

    @property
    def num_running(self) -> int:
        return len(self.running) - self._num_stale_running + len(self.pulling)

    def finish_request(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.request_id in self.pulling:
            raise ValueError(
                f"request {request.request_id!r} is being pulled; end it with drop_migration "
                "once its transfer is final"
            )
        if request in self.pending:
            self.drop_migration(request, status, now)
            return
        super().finish_request(request, status, now)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        """Aborts a pending, waiting or running request; one being pulled is not touched
        (the transfer still writes its blocks) and None is returned."""
        if request_id in self.pulling:
            return None
        return super().abort_request(request_id, now)


def _never_fits(request: Request, bm: BlockManager) -> str:
    return (
        f"needs {request.num_computed_tokens} tokens of KV cache on the decode instance, more "
        f"than its pool can ever grant one request ({bm.num_blocks} blocks of "
        f"{bm.block_size} tokens)"
    )

"""Chunked prefill (Sarathi-Serve, DeepSpeed-MII's Dynamic SplitFuse): decodes first, then
prefill chunks fill the step's token budget.

Per step, `max_num_batched_tokens` tokens at most: every running request decodes one token
(preempting by recompute, most recently arrived first, when the pool cannot give them all a
slot); the remaining budget goes to prefill chunks: first the requests whose prefill is
partly done (FCFS), then new requests FCFS. A request is admitted with blocks for its whole
prompt, so its later chunks never wait for memory. A chunk that is not the last of its
prompt produces no token. Stall-free: a long prompt never delays the running decodes by
more than one budget's worth of compute.
"""

from __future__ import annotations

from distserve_rt.core.block_manager import AllocStatus, BlockManager
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler.base import SchedulerBase
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    SchedulerConfig,
    SchedulerOutput,
)


class ChunkedPrefillScheduler(SchedulerBase):
    """Decode-first scheduling with a per-step token budget."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.max_num_seqs > config.max_num_batched_tokens:
            # Every running request decodes each step; they must fit one budget.
            raise ValueError(
                f"max_num_seqs ({config.max_num_seqs}) must be <= max_num_batched_tokens "
                f"({config.max_num_batched_tokens}) with chunked prefill"
            )
        super().__init__(config, block_manager)

    def schedule(self, now: float) -> SchedulerOutput:
        finished = self._begin_step()
        preempted: list[Request] = []
        decodes, slots = self._reserve_decodes(now, preempted)
        budget = self.config.max_num_batched_tokens - len(decodes)
        prefills, budget = self._continue_prefills(budget)
        if not preempted:
            # After a preemption the pool is short: admitting now would only thrash.
            prefills += self._admit_new(budget, now)
        return self._build_output(prefills, decodes, slots, preempted, finished)

    def _continue_prefills(self, budget: int) -> tuple[list[ScheduledPrefill], int]:
        prefills: list[ScheduledPrefill] = []
        for request in list(self.prefilling):
            if budget == 0:
                break
            chunk = self._schedule_chunk(request, min(request.num_uncomputed_tokens, budget))
            budget -= chunk.num_new_tokens
            prefills.append(chunk)
            if chunk.produces_token:
                self.prefilling.remove(request)
                self.running.append(request)
        return prefills, budget

    def _admit_new(self, budget: int, now: float) -> list[ScheduledPrefill]:
        prefills: list[ScheduledPrefill] = []
        num_seqs = self._num_seqs()
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if num_seqs + request.num_seqs > self.config.max_num_seqs:
                break
            status = self._try_admit(request, now)
            if status is AllocStatus.LATER:
                break
            self.waiting.popleft()
            if status is AllocStatus.NEVER:
                continue
            # Uncomputed, not all: the prompt's cached blocks (prefix caching) are skipped.
            chunk = self._schedule_chunk(request, min(request.num_uncomputed_tokens, budget))
            budget -= chunk.num_new_tokens
            num_seqs += 1 + len(chunk.forks) + len(request.forks)
            prefills.append(chunk)
            (self.running if chunk.produces_token else self.prefilling).append(request)
        return prefills

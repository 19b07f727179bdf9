"""vLLM v0's default policy: prefill first, then decode everything that runs.

Each step is either prefill-only or decode-only. If waiting requests fit (token budget,
`max_num_seqs`, KV blocks above the watermark), the step prefills as many of them as fit,
FCFS, each whole (a prompt is never split). Otherwise every running request decodes one
token; when the pool cannot give all of them a slot, the most recently arrived one is
preempted by recompute until the rest fit.
"""

from __future__ import annotations

import numpy as np

from distserve_rt.core.block_manager import AllocStatus, BlockManager
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler.base import SchedulerBase
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    SchedulerConfig,
    SchedulerOutput,
)


class ContinuousBatchingScheduler(SchedulerBase):
    """Prefill-first continuous batching (Orca/vLLM)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.max_num_batched_tokens < config.max_model_len:
            # Whole prompts only: a prompt longer than the budget could never be scheduled.
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                f"max_model_len ({config.max_model_len}) without chunked prefill"
            )
        super().__init__(config, block_manager)

    def schedule(self, now: float) -> SchedulerOutput:
        finished = self._begin_step()
        prefills = self._schedule_prefills(now)
        if prefills:
            return self._build_output(prefills, [], _no_slots(), [], finished)
        preempted: list[Request] = []
        decodes, slots = self._reserve_decodes(now, preempted)
        return self._build_output([], decodes, slots, preempted, finished)

    def _schedule_prefills(self, now: float) -> list[ScheduledPrefill]:
        budget = self.config.max_num_batched_tokens
        num_seqs = len(self.running)
        prefills: list[ScheduledPrefill] = []
        while self.waiting and num_seqs < self.config.max_num_seqs:
            request = self.waiting[0]
            # A recomputed request prefills its generated tokens too.
            num_new_tokens = request.num_tokens
            if num_new_tokens > budget or num_seqs + request.num_seqs > self.config.max_num_seqs:
                break
            status = self._try_admit(request, now)
            if status is AllocStatus.LATER:
                break
            self.waiting.popleft()
            if status is AllocStatus.NEVER:
                continue
            # Less than num_tokens when the prompt's first blocks were in the prefix cache.
            num_new_tokens = request.num_uncomputed_tokens
            num_seqs += request.num_seqs  # its forks join `running` in _schedule_chunk
            prefills.append(self._schedule_chunk(request, num_new_tokens))
            self.running.append(request)
            budget -= num_new_tokens
        return prefills


def _no_slots() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)

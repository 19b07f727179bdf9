"""The periodic one-line stats log of an engine: throughput, queues, KV usage, preemptions."""

from __future__ import annotations

import logging

from distserve_rt.core.block_manager import BlockManagerStats


class StatsLogger:
    """Counts tokens per step; logs one line every `interval_s` seconds (0 = never)."""

    def __init__(self, logger: logging.Logger, interval_s: float, now: float) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last_time = now
        self._num_prefill_tokens = 0
        self._num_generated_tokens = 0
        self._num_preemptions = 0

    def record_step(self, num_prefill_tokens: int, num_generated: int, num_preempted: int) -> None:
        self._num_prefill_tokens += num_prefill_tokens
        self._num_generated_tokens += num_generated
        self._num_preemptions += num_preempted

    def due(self, now: float) -> bool:
        """Whether `log` should run now (cheap: the engine asks every step)."""
        return bool(self._interval_s) and now - self._last_time >= self._interval_s

    def log(self, now: float, num_running: int, num_waiting: int, kv: BlockManagerStats) -> None:
        elapsed = max(now - self._last_time, 1e-9)
        self._logger.info(
            "prefill %.1f tok/s, generation %.1f tok/s | running %d, waiting %d | "
            "KV usage %.1f%% of %d blocks | preemptions %d",
            self._num_prefill_tokens / elapsed,
            self._num_generated_tokens / elapsed,
            num_running,
            num_waiting,
            100.0 * kv.usage,
            kv.num_blocks,
            self._num_preemptions,
        )
        self._last_time = now
        self._num_prefill_tokens = self._num_generated_tokens = self._num_preemptions = 0

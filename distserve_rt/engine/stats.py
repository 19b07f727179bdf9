"""The periodic one-line stats log of an engine, colocated (`LLMEngine`) or disaggregated
(`Controller`): throughput, queues, KV usage, and preemptions or KV migrations.

Prefill throughput counts the prompt tokens of finished prefills, prefix-cache hits
included (vLLM's "prompt throughput"), in both placements; decode throughput counts the
tokens generated after each request's first. Both are averaged over the busy window: the
time since the last line during which the engine had unfinished requests (its steps run
back to back then). Dividing by wall time instead would make an engine that worked 1 s of
the last 10 report a tenth of its real rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from distserve_rt.engine.protocol import EngineStats, TransferTotals

Clock = Callable[[], float]
"""Seconds, monotonic (``time.monotonic``; tests drive their own)."""


class StatsLogger:
    """Counts an engine's work and logs one line every `interval_s` seconds while it works.

    The engine reports the tokens it computed (`record`) and whether it has unfinished
    requests (`observe`, at least at the start and end of each step and when a request
    arrives); after each step it calls `maybe_log` with a function that takes its snapshot
    (called only when a line is due). A window without work logs nothing, so an idle
    engine is silent. ``interval_s <= 0`` disables the line.
    """

    def __init__(
        self, logger: logging.Logger, interval_s: float, clock: Clock = time.monotonic
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last_log = clock()
        self._busy_since: float | None = None
        """Start of the current busy period not yet added to `_busy_s`; None when idle."""
        self._busy_s = 0.0
        self._num_prefill_tokens = 0
        self._num_decode_tokens = 0
        self._num_preemptions = 0
        self._transfers = TransferTotals()
        """The engine's transfer totals at the last line (the line shows the difference)."""

    def record(
        self, num_prefill_tokens: int = 0, num_decode_tokens: int = 0, num_preemptions: int = 0
    ) -> None:
        """Work done: prompt tokens prefilled, tokens decoded, requests preempted."""
        self._num_prefill_tokens += num_prefill_tokens
        self._num_decode_tokens += num_decode_tokens
        self._num_preemptions += num_preemptions

    def observe(self, busy: bool) -> None:
        """The engine has (busy) or has no unfinished request from now on."""
        now = self._clock()
        if self._busy_since is not None:
            self._busy_s += now - self._busy_since
        elif busy and not self._has_work():
            # Work starts after a silent idle stretch: the interval counts from here, so
            # the first line covers a full interval of work instead of one step.
            self._last_log = now
        self._busy_since = now if busy else None

    def maybe_log(self, snapshot: Callable[[], EngineStats]) -> bool:
        """Logs the line when `interval_s` has passed since the last one and the window
        saw work; returns whether it logged."""
        if self._interval_s <= 0:
            return False
        now = self._clock()
        if now - self._last_log < self._interval_s:
            return False
        self.observe(self._busy_since is not None)  # adds the busy time up to now
        logged = self._has_work()
        if logged:
            stats = snapshot()
            self._logger.info(self._format(stats, now - self._last_log))
            self._transfers = replace(stats.transfers)
        self._last_log = now
        self._busy_s = 0.0
        self._num_prefill_tokens = self._num_decode_tokens = self._num_preemptions = 0
        return logged

    def _has_work(self) -> bool:
        return bool(self._busy_s or self._num_prefill_tokens or self._num_decode_tokens)

    def _format(self, stats: EngineStats, window_s: float) -> str:
        busy_s = self._busy_s
        prefill = self._num_prefill_tokens / busy_s if busy_s > 0 else 0.0
        decode = self._num_decode_tokens / busy_s if busy_s > 0 else 0.0
        parts = [
            f"prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s "
            f"(busy {busy_s:.1f} s of {window_s:.1f} s)",
            *_queues(stats),
            _kv_usage(stats),
        ]
        queries = sum(s.prefix_cache_queries for s in stats.instances)
        if queries:  # caching on and something admitted; since start, as vLLM's gauge
            hits = sum(s.prefix_cache_hits for s in stats.instances)
            parts.append(f"prefix cache hit rate {100.0 * hits / queries:.1f}%")
        if stats.transfers.transport == "none":  # colocated: no migration, may preempt
            parts.append(f"preemptions {self._num_preemptions}")
        else:
            parts.append(_migrations(stats.transfers, self._transfers))
        return " | ".join(parts)


def _queues(stats: EngineStats) -> list[str]:
    """'running r, waiting w' per role (prefixed by the role when the engine has two)."""
    roles = list(dict.fromkeys(s.role for s in stats.instances))
    out = []
    for role in roles:
        live = [s for s in stats.instances if s.role == role and s.alive]
        running, waiting = sum(s.num_running for s in live), sum(s.num_waiting for s in live)
        prefix = "" if role == "colocated" else f"{role} "
        out.append(f"{prefix}running {running}, waiting {waiting}")
    return out


def _kv_usage(stats: EngineStats) -> str:
    if len(stats.instances) == 1:
        return f"KV usage {100.0 * stats.instances[0].kv_usage:.1f}%"
    per_instance = [
        f"{s.name} {100.0 * s.kv_usage:.1f}%" if s.alive else f"{s.name} dead"
        for s in stats.instances
    ]
    return "KV usage " + ", ".join(per_instance)


def _migrations(now: TransferTotals, last: TransferTotals) -> str:
    """Migrations finished since the last line, their throughput while transferring (bytes
    over the transfers' own seconds, so idle links do not dilute it), and failures."""
    num = now.num_transfers - last.num_transfers
    num_bytes, seconds = now.bytes - last.bytes, now.seconds - last.seconds
    rate = f" ({num_bytes / seconds / 1e9:.2f} GB/s)" if seconds > 0 else ""
    return f"migrations {num}{rate}, failed transfers {now.num_failures - last.num_failures}"

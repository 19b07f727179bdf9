"""`SchedulerConfig`: the limits every batching policy respects, and the policies' names.

The names live here (not beside the scheduler classes in `core.scheduler`) so that
`EngineConfig` validates ``policy`` without importing the schedulers; `core.scheduler`
maps each name to its class and checks it covers exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.config.validation import check_range

POLICY_NAMES = ("continuous_batching", "chunked_prefill")
"""Colocated batching policies (`core.scheduler.POLICIES` maps them to classes)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits every policy respects."""

    max_num_seqs: int = 256
    """Requests holding KV (running or being prefilled) at most."""
    max_num_batched_tokens: int = 2048
    """Tokens (prefill + decode) one step computes at most."""
    max_model_len: int = 2048
    """Context length: prompt + generated tokens at most."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            check_range(name, getattr(self, name), low=1, integer=True)

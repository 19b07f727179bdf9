"""Where disaggregated work goes: the controller's two dispatch rules as pure functions, so
that the runtime (`engine/controller.py`) and the planner's scheduler-driven simulator
apply the same ones (a rule changed in one place only would make the plan lie)."""

from __future__ import annotations

from collections.abc import Sequence


def pick_prefill(num_queued_tokens: Sequence[int]) -> int:
    """Index of the prefill instance with the fewest queued prompt tokens (ties: the first).
    Counted in tokens, not requests: a queue of long prompts is longer work."""
    if not num_queued_tokens:
        raise ValueError("num_queued_tokens must name at least one prefill instance, got none")
    return min(range(len(num_queued_tokens)), key=num_queued_tokens.__getitem__)


def decode_load(num_assigned: int, num_free_blocks: int) -> tuple[int, int]:
    """Sort key of a decode instance, least loaded first: the fewest requests assigned to it,
    ties the most free KV blocks."""
    return (num_assigned, -num_free_blocks)

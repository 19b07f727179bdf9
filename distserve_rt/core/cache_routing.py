"""Where a disaggregated request's KV should live: the two cache-aware rules as pure
functions of plain numbers, so that the controller (`engine/controller.py`) and the
planner's simulator apply the same ones (a rule changed in one place only would make the
plan lie).

- `pick_decode_instance`: the decode instance that already holds the longest prefix of a
  request's blocks (it then pulls only the rest), among those whose load is within a cap of
  the least loaded one, so that a hot prefix does not pile every request onto one instance.
- `prefill_locally`: conditional disaggregation (Dynamo, llm-d): prefill on the decode
  instance itself when what it lacks of the prompt is short (a transfer would cost more than
  the compute) or the prefill queue is long (waiting would cost more than the interference).
"""

from __future__ import annotations

from collections.abc import Sequence


def pick_decode_instance(
    num_cached_blocks: Sequence[int],
    num_assigned: Sequence[int],
    num_free_blocks: Sequence[int],
    max_load_imbalance: int,
) -> int:
    """Index of the decode instance a migration goes to.

    Args:
        num_cached_blocks: per instance, the leading blocks of the request it holds cached.
        num_assigned: per instance, the requests assigned to it (its load).
        num_free_blocks: per instance, its free KV blocks (the second tie-breaker).
        max_load_imbalance: an instance is eligible only while its load is at most this many
            requests above the least loaded instance's (0: pure least-loaded, the prefix only
            breaks ties).

    Among eligible instances: the most cached blocks, then the fewest assigned requests, then
    the most free blocks, then the first.
    """
    n = len(num_cached_blocks)
    if n == 0:
        raise ValueError("num_cached_blocks must name at least one decode instance, got none")
    if len(num_assigned) != n or len(num_free_blocks) != n:
        raise ValueError(
            f"num_cached_blocks, num_assigned and num_free_blocks must have one entry per "
            f"instance, got {n}, {len(num_assigned)} and {len(num_free_blocks)}"
        )
    if isinstance(max_load_imbalance, bool) or not isinstance(max_load_imbalance, int):
        raise ValueError(f"max_load_imbalance must be an int >= 0, got {max_load_imbalance!r}")
    if max_load_imbalance < 0:
        raise ValueError(f"max_load_imbalance must be an int >= 0, got {max_load_imbalance}")
    cap = min(num_assigned) + max_load_imbalance
    eligible = [i for i in range(n) if num_assigned[i] <= cap]
    return min(
        eligible, key=lambda i: (-num_cached_blocks[i], num_assigned[i], -num_free_blocks[i])
    )


def prefill_locally(
    num_uncached_tokens: int,
    num_prefill_queue_tokens: int,
    *,
    max_uncached_tokens: int,
    min_prefill_queue_tokens: int,
    num_prompt_tokens: int | None = None,
    max_num_batched_tokens: int | None = None,
) -> bool:
    """Whether a request is prefilled on its decode instance instead of a prefill instance.

    Args:
        num_uncached_tokens: prompt tokens the decode instance would compute (the prompt
            minus the prefix it holds cached).
        num_prefill_queue_tokens: prompt tokens queued at the least loaded prefill instance.
        max_uncached_tokens: prefill locally when ``num_uncached_tokens`` is at most this
            (0: never for shortness).
        min_prefill_queue_tokens: prefill locally when the prefill queue holds at least this
            many tokens, whatever the prompt's length (0: never for the queue); the decode
            instance still runs at most its token budget of prefill per step.
        num_prompt_tokens, max_num_batched_tokens: when both are given, never locally when
            the whole prompt is longer than the decode instance's step budget: the uncached
            part is the router's estimate (the instance may have evicted blocks since), and
            the instance prefills a request in one step, which must fit its budget.

    Both thresholds 0 (the default configuration) means always disaggregated.
    """
    for name, value in (
        ("num_uncached_tokens", num_uncached_tokens),
        ("num_prefill_queue_tokens", num_prefill_queue_tokens),
        ("max_uncached_tokens", max_uncached_tokens),
        ("min_prefill_queue_tokens", min_prefill_queue_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if (
        num_prompt_tokens is not None
        and max_num_batched_tokens is not None
        and num_prompt_tokens > max_num_batched_tokens
    ):
        return False
    if max_uncached_tokens and num_uncached_tokens <= max_uncached_tokens:
        return True
    return bool(min_prefill_queue_tokens) and num_prefill_queue_tokens >= min_prefill_queue_tokens

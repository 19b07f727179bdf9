"""The cache-aware dispatch rules without an engine: which decode instance a request goes to
(`pick_decode_instance`), whether it is prefilled there (`prefill_locally`), and the
controller's approximate view of the decode instances' caches (`DecodePrefixIndex`)."""

from __future__ import annotations

import pytest

from distserve_rt.core.block_manager import prefix_block_hashes
from distserve_rt.core.cache_routing import pick_decode_instance, prefill_locally
from distserve_rt.engine.disagg.routing import DecodePrefixIndex


def test_longest_cached_prefix_wins_within_the_load_cap():
    # Instance 1 holds 5 blocks but has 3 more requests than instance 0: within a cap of 4.
    assert pick_decode_instance([2, 5, 0], [1, 4, 1], [10, 10, 10], 4) == 1
    # A cap of 2 makes it ineligible: the best of the rest (instance 0's 2 blocks) wins.
    assert pick_decode_instance([2, 5, 0], [1, 4, 1], [10, 10, 10], 2) == 0


def test_ties_go_to_the_least_loaded_then_most_free_blocks_then_the_first():
    assert pick_decode_instance([3, 3], [2, 1], [0, 0], 4) == 1
    assert pick_decode_instance([0, 0, 0], [1, 1, 1], [5, 9, 9], 4) == 1
    assert pick_decode_instance([0, 0], [0, 0], [5, 5], 0) == 0


def test_a_cap_of_zero_is_least_loaded_with_the_prefix_breaking_ties():
    assert pick_decode_instance([9, 0], [2, 1], [0, 0], 0) == 1
    assert pick_decode_instance([1, 4], [1, 1], [0, 0], 0) == 1


def test_a_hot_prefix_spreads_once_its_instance_is_capped():
    """Every request shares one prefix cached on instance 0: it takes requests until it is
    `cap` ahead, then the others get them; the gap never exceeds the cap."""
    assigned, cap = [0, 0, 0], 2
    for _ in range(30):
        cached = [4, 0, 0]
        i = pick_decode_instance(cached, assigned, [100] * 3, cap)
        assigned[i] += 1
        assert max(assigned) - min(assigned) <= cap + 1
    assert assigned[0] == max(assigned) and min(assigned) >= 8


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [], [], 1), "at least one decode instance"),
        (([1], [1, 2], [1], 1), "one entry per instance"),
        (([1], [1], [1], -1), "max_load_imbalance must be an int >= 0, got -1"),
        (([1], [1], [1], 1.5), "max_load_imbalance must be an int >= 0, got 1.5"),
    ],
)
def test_pick_decode_instance_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pick_decode_instance(*args)


def test_prefill_locally_when_the_uncached_part_is_short_or_the_queue_long():
    rule = dict(max_uncached_tokens=32, min_prefill_queue_tokens=1000)
    assert prefill_locally(32, 0, **rule) and not prefill_locally(33, 0, **rule)
    assert prefill_locally(5000, 1000, **rule) and not prefill_locally(5000, 999, **rule)


def test_prefill_locally_is_off_with_zero_thresholds():
    off = dict(max_uncached_tokens=0, min_prefill_queue_tokens=0)
    assert not prefill_locally(0, 10**9, **off)
    assert not prefill_locally(1, 10**9, **off)
    assert prefill_locally(1, 0, max_uncached_tokens=1, min_prefill_queue_tokens=0)
    assert not prefill_locally(2, 10**9, max_uncached_tokens=1, min_prefill_queue_tokens=0)


def test_never_locally_when_the_whole_prompt_exceeds_the_decode_step_budget():
    rule = dict(max_uncached_tokens=64, min_prefill_queue_tokens=1)
    assert prefill_locally(16, 5, **rule, num_prompt_tokens=512, max_num_batched_tokens=512)
    assert not prefill_locally(16, 5, **rule, num_prompt_tokens=513, max_num_batched_tokens=512)


@pytest.mark.parametrize("name", ["num_uncached_tokens", "max_uncached_tokens"])
@pytest.mark.parametrize("value", [-1, 1.0, True])
def test_prefill_locally_refuses_bad_input(name, value):
    kwargs = dict(
        num_uncached_tokens=1, num_prefill_queue_tokens=0, max_uncached_tokens=1,
        min_prefill_queue_tokens=0,
    )  # fmt: skip
    kwargs[name] = value
    with pytest.raises(ValueError, match=f"{name} must be an int >= 0, got {value!r}"):
        prefill_locally(**kwargs)


def test_prefix_index_matches_leading_blocks_and_forgets_the_oldest():
    index = DecodePrefixIndex({0: 4, 1: 4}, block_size=8)
    conversation = list(range(40))
    hashes = index.block_hashes(conversation)
    assert hashes == prefix_block_hashes(conversation, 8).tolist() and len(hashes) == 5
    assert index.block_hashes(conversation[:7]) == []
    index.record(0, hashes[:3])
    assert index.num_cached_blocks(0, hashes) == 3 and index.num_cached_blocks(1, hashes) == 0
    # A chain: a later block without the earlier ones is no prefix.
    index.record(1, hashes[1:3])
    assert index.num_cached_blocks(1, hashes) == 0
    # Capacity 4 per instance: recording 3 other blocks on instance 0 evicts its oldest two.
    other = index.block_hashes(list(range(100, 124)))
    index.record(0, other)
    assert index.num_cached_blocks(0, hashes) == 0 and index.num_cached_blocks(0, other) == 3
    assert index.pick([0, 1], other, [0, 0], [0, 0], 4) == (0, 3)

"""The controller's dispatch rules (shared with the scheduler-driven simulator)."""

from __future__ import annotations

import pytest

from distserve_rt.core.dispatch import decode_load, pick_prefill


def test_pick_prefill_takes_the_fewest_queued_tokens_first_on_ties():
    assert pick_prefill([100, 10, 50]) == 1
    assert pick_prefill([7, 3, 3]) == 1


def test_pick_prefill_refuses_no_instance():
    with pytest.raises(ValueError, match="at least one prefill instance"):
        pick_prefill([])


def test_decode_load_orders_by_assigned_requests_then_free_blocks():
    loads = [decode_load(2, 900), decode_load(1, 10), decode_load(1, 50)]
    assert min(range(3), key=loads.__getitem__) == 2

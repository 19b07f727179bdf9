"""The delta pull under TP x PP re-slicing: a follow-up turn whose decode instance holds the
first turn's blocks pulls only the rest, every decode rank its own slice (heads <-> layers),
and the tokens equal the colocated engine's without any cache. Instances run on threads,
their ranks in worker processes (~3-5 s per pair)."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from tests.engine.disagg_helpers import engine_config, greedy, settle
from tests.engine.test_disagg_decode_cache import _conversations, expected  # noqa: F401


@pytest.mark.slow  # ~20 s each on a shared 2-core machine (process start-up, gloo)
@pytest.mark.parametrize(
    ("prefill", "decode"),
    [((2, 1), (1, 2)), ((1, 2), (2, 1))],
    ids=["p-tp2-to-d-pp2", "p-pp2-to-d-tp2"],
)
def test_a_follow_up_pulls_only_its_delta_across_parallelism(expected, prefill, decode):  # noqa: F811
    placement = Placement.disaggregated(
        PhaseConfig(tp=prefill[0], pp=prefill[1]), PhaseConfig(tp=decode[0], pp=decode[1])
    )
    dc = DisaggConfig(launcher="thread", stats_interval_s=0.01)
    with Controller(engine_config(), placement, dc) as c:
        assert _conversations(c, greedy(8)) == expected["greedy"]
        settle(c, lambda: c.stats().transfers.num_transfers == 4)
        decode_stats = [s for s in c.stats().instances if s.role == "decode"]
        # Turn 1: 2 x 5 blocks pulled; turn 2: 2 x 3 pulled, 2 x 5 found cached.
        assert [(s.num_blocks_pulled, s.num_blocks_reused) for s in decode_stats] == [(16, 10)]

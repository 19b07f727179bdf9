"""Deployments at the rate: replica counts, devices, goodput and the ranking order."""

from __future__ import annotations

import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.planner.candidates import (
    Algorithm,
    Candidate,
    fit_to_cluster,
    num_nodes_needed,
    num_replicas,
    parallelism_label,
)
from distserve_rt.planner.latency_model import ConstantLatencyModel
from distserve_rt.planner.simulator import DisaggSpec, SimInstanceSpec

_SPEC = SimInstanceSpec(ConstantLatencyModel(0.1, 0.01), 1000)


def _apart(prefill, decode, gp, gd, rate) -> Candidate:
    n_p, n_d = num_replicas(rate, gp), num_replicas(rate, gd)
    unit = DisaggSpec(_SPEC, _SPEC, n_p, n_d)
    return Candidate(Algorithm.PHASES_APART, prefill, decode, n_p, n_d, gp, gd, unit)


def test_num_replicas_rounds_up_but_not_on_float_noise():
    assert num_replicas(3.0, 1.5) == 2
    assert num_replicas(0.3 * 3, 0.3) == 3  # 0.8999999999999999 / 0.3
    assert num_replicas(3.0, 200.0) == 1
    assert num_replicas(3.1, 1.5) == 3
    with pytest.raises(ValueError, match="goodput must be > 0"):
        num_replicas(3.0, 0.0)


def test_deployment_devices_goodput_and_unrounded_per_device():
    # Prefill tp2pp2 at 10 req/s, decode tp1 at 4 req/s, rate 9: 1 prefill + 3 decode.
    c = _apart(Parallelism(2, 2), Parallelism(1, 1), 10.0, 4.0, 9.0)
    assert (c.num_prefill, c.num_decode, c.num_devices) == (1, 3, 7)
    assert c.goodput == 10.0 and c.per_device == pytest.approx(10 / 7)
    # Paper's unrounded mix: r / (r/10 * 4 + r/4 * 1) per device.
    assert c.unit_per_device == pytest.approx(1 / (4 / 10 + 1 / 4))


def test_a_small_rate_ranks_the_small_deployment_first():
    # tp2pp10 has the best per-device goodput (10/device) but at 3 req/s one tp1 (4.4 req/s)
    # needs 1 device, not 20.
    big = _apart(Parallelism(2, 10), Parallelism(1, 1), 200.0, 4.0, 3.0)
    small = _apart(Parallelism(1, 1), Parallelism(1, 1), 4.4, 4.0, 3.0)
    assert big.unit_per_device > small.unit_per_device
    assert sorted([big, small], key=Candidate.rank_key) == [small, big]
    # At equal devices and goodput per device, fewer pipeline stages rank first.
    piped = _apart(Parallelism(1, 2), Parallelism(1, 1), 8.8, 4.0, 3.0)
    flat = _apart(Parallelism(2, 1), Parallelism(1, 1), 8.8, 4.0, 3.0)
    assert sorted([piped, flat], key=Candidate.rank_key) == [flat, piped]


def test_colocated_and_pairs():
    col = Candidate(Algorithm.COLOCATED, Parallelism(2, 1), None, 3, 0, 2.5, 2.5, _SPEC)
    assert (col.num_devices, col.goodput, col.label()) == (6, 7.5, "colocated tp2pp1")
    unit = DisaggSpec(_SPEC, _SPEC, 2, 2)
    pair = Candidate(
        Algorithm.PAIRS_IN_NODES, Parallelism(1, 2), Parallelism(1, 2), 2, 2, 3.0, 3.0, unit, 2
    )
    assert pair.num_devices == 8 and pair.goodput == 6.0 and pair.unit_per_device == 0.75
    assert pair.label() == "P tp1pp2 + D tp1pp2 (2 nodes)"


def test_candidate_validation():
    with pytest.raises(ValueError, match="goodputs > 0"):
        Candidate(Algorithm.COLOCATED, Parallelism(1, 1), None, 1, 0, 0.0, 0.0, _SPEC)
    with pytest.raises(ValueError, match="decode must be None exactly when colocated"):
        Candidate(Algorithm.COLOCATED, Parallelism(1, 1), Parallelism(1, 1), 1, 0, 1.0, 1.0, _SPEC)


def test_candidate_takes_parallelism_not_tuples():
    # The old spelling, a (tp, pp) tuple, fails at construction with the field named, not
    # later as an AttributeError deep in the ranking.
    with pytest.raises(ValueError, match=r"prefill must be a Parallelism, got \(2, 1\)"):
        Candidate(Algorithm.COLOCATED, (2, 1), None, 1, 0, 1.0, 1.0, _SPEC)
    with pytest.raises(ValueError, match=r"decode must be a Parallelism, got \(1, 1\)"):
        _apart(Parallelism(1, 1), (1, 1), 1.0, 1.0, 1.0)


def test_parallelism_label_is_the_tables_spelling():
    assert parallelism_label(Parallelism(2, 3)) == "tp2pp3"
    # Hashable and equal by value: the planner's caches key goodputs on it.
    assert {Parallelism(2, 3): 1}[Parallelism(2, 3)] == 1


def test_a_colocated_deployment_with_more_goodput_per_device_on_fewer_devices_ranks_first():
    # Issue 15: at 5 req/s a 16-device disaggregated plan at 0.578 req/s per device was
    # chosen over one colocated tp8 instance (8 devices) at 0.815 per device.
    col = Candidate(Algorithm.COLOCATED, Parallelism(8, 1), None, 1, 0, 6.52, 6.52, _SPEC)
    disagg = _apart(Parallelism(8, 1), Parallelism(8, 1), 9.25, 10.0, 5.0)
    assert (col.num_devices, disagg.num_devices) == (8, 16)
    assert col.per_device == pytest.approx(0.815) and disagg.per_device == pytest.approx(
        0.578, abs=1e-3
    )
    assert sorted([disagg, col], key=Candidate.rank_key) == [col, disagg]
    # More goodput per device ranks first even on more devices (a disaggregated 4-device
    # deployment at 0.7 per device over the colocated 8 at 0.815: not fewest devices first).
    small = _apart(Parallelism(2, 1), Parallelism(2, 1), 2.8, 3.0, 2.0)
    assert (small.num_devices, small.per_device) == (4, pytest.approx(0.7))
    assert sorted([small, col], key=Candidate.rank_key) == [col, small]
    # At equal goodput per device the fewer devices rank first, whatever the placement.
    twice = Candidate(Algorithm.COLOCATED, Parallelism(8, 1), None, 2, 0, 6.52, 6.52, _SPEC)
    assert sorted([twice, col], key=Candidate.rank_key) == [col, twice]


def test_fit_to_cluster_takes_as_many_replicas_as_the_devices_hold():
    col = Candidate(Algorithm.COLOCATED, Parallelism(6, 1), None, 3, 0, 4.3, 4.3, _SPEC)
    fitted = fit_to_cluster(col, 16)
    assert (fitted.num_prefill, fitted.num_devices, fitted.goodput) == (2, 12, 8.6)
    assert fit_to_cluster(col, 5) is None
    unit = DisaggSpec(_SPEC, _SPEC, 5, 5)
    pair = Candidate(
        Algorithm.PAIRS_IN_NODES, Parallelism(2, 2), Parallelism(2, 2), 5, 5, 3.0, 3.0, unit, 2
    )
    fitted = fit_to_cluster(pair, 16)
    assert (fitted.num_prefill, fitted.num_decode, fitted.unit.num_prefill) == (2, 2, 2)
    # Phases apart: 10 devices of tp1 prefill (4 req/s) and tp1 decode (2 req/s) carry the
    # most with 3 prefill + 6 decode (12 req/s, the prefill count cut to what 12 needs).
    apart = _apart(Parallelism(1, 1), Parallelism(1, 1), 4.0, 2.0, 40.0)
    fitted = fit_to_cluster(apart, 10)
    assert (fitted.num_prefill, fitted.num_decode, fitted.goodput) == (3, 6, 12.0)
    assert (fitted.unit.num_prefill, fitted.unit.num_decode) == (3, 6)
    assert fit_to_cluster(_apart(Parallelism(1, 4), Parallelism(1, 4), 1, 1, 1), 4) is None


def test_num_nodes_needed_packs_whole_instances_into_nodes():
    # One tp6 instance per 8-device node: 4 of them need 4 nodes, not ceil(24 / 8) = 3.
    col = Candidate(Algorithm.COLOCATED, Parallelism(6, 1), None, 4, 0, 4.3, 4.3, _SPEC)
    assert num_nodes_needed(col, 8) == 4
    pair = Candidate(
        Algorithm.PAIRS_IN_NODES,
        Parallelism(2, 2),
        Parallelism(2, 2),
        3,
        3,
        3.0,
        3.0,
        DisaggSpec(_SPEC, _SPEC, 3, 3),
        2,
    )
    # Each pair puts 4 devices on each of its 2 nodes: 2 pairs per pair of 8-device nodes.
    assert num_nodes_needed(pair, 8) == 4
    assert num_nodes_needed(_apart(Parallelism(2, 1), Parallelism(1, 1), 1, 1, 5), 8) == 2

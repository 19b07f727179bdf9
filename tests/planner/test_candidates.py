"""Deployments at the rate: replica counts, devices, goodput and the ranking order."""

from __future__ import annotations

import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.planner.candidates import (
    Algorithm,
    Candidate,
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

"""`drt-run plan` answers the question asked when the cluster cannot meet it (issue 15):
the best placement the cluster can run, written and marked best effort with the rate it
sustains, and what would meet the target."""

from __future__ import annotations

import json

import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.config.placement import Placement
from distserve_rt.entrypoints.cli import main
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.candidates import Algorithm, Candidate
from distserve_rt.planner.cluster import ClusterSpec
from distserve_rt.planner.placement import PlanInputs, Planner
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import DisaggSpec
from distserve_rt.workloads import Workload

# OPT-13B on one node of 2 devices at 20 req/s: one tp1 instance carries ~2.8 req/s.
_UNREACHABLE = [
    "plan",
    "--model",
    "opt-13b",
    "--rate",
    "20",
    "--num-requests",
    "60",
    "--devices-per-node",
    "2",
    "--affinity",
    "high",
    "--no-progress",
]


def test_an_unreachable_rate_gets_the_best_effort_placement_and_what_would_meet_it(
    tmp_path, capsys
):
    path = tmp_path / "p.yaml"
    assert main([*_UNREACHABLE, "--output", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best_effort"] and out["fits_cluster"]
    pred = out["placement"]["predicted"]
    # The rate it sustains is its replicas x one replica's goodput at the SLO target.
    num_instances = out["placement"]["prefill"]["num_instances"]
    assert pred["sustained_rate"] == pytest.approx(num_instances * pred["prefill_instance_goodput"])
    assert 0 < pred["sustained_rate"] < pred["asked_rate"] == 20
    assert pred["best_effort"].startswith(f"best effort: sustains {pred['sustained_rate']:.3g}")
    assert pred["num_devices"] <= 2 and pred["meets_target"] and pred["rate"] < 20
    # What would meet it: more devices than the cluster has, carrying the rate.
    needed = out["needed"]
    assert needed["num_devices"] > 2 and needed["goodput"] >= 20
    assert needed["num_nodes"] * 2 >= needed["num_devices"]
    # The file is marked, and `drt-run serve --placement` reads it.
    assert path.read_text().startswith("# best effort: sustains ")
    placement = Placement.from_file(path)
    assert placement.kind.value == out["placement"]["placement"]


def test_the_best_effort_answer_in_the_text(tmp_path, capsys):
    assert main([*_UNREACHABLE, "--output", str(tmp_path / "p.yaml")]) == 0
    text = capsys.readouterr().out
    assert "no placement on the cluster's 2 devices meets the target at 20 req/s" in text
    assert "best effort: sustains " in text and " of the 20 asked (" in text
    assert "to meet 20 req/s: " in text and "node(s) of 2" in text
    assert "placement file: " in text


def test_nothing_fits_the_cluster_is_one_line():
    inputs = PlanInputs(
        model=get_preset("opt-13b"),
        cluster=ClusterSpec(num_nodes=1, devices_per_node=4),
        workload=Workload.from_dataset("chat").sample(10, seed=0),
        slo=SLO(0.25, 0.1),
        profile=load_profile("a100-80g-distserve"),
        rate=1.0,
        show_progress=False,
    )
    planner = Planner(inputs)
    spec = planner._instance(Parallelism(1, 4), inputs.cluster.intra_link, 512)
    apart = Candidate(
        Algorithm.PHASES_APART,
        Parallelism(1, 4),
        Parallelism(1, 4),
        1,
        1,
        2.0,
        2.0,
        DisaggSpec(spec, spec),
    )
    message = r"^nothing fits the cluster: .* needs 8 devices, the cluster has 4$"
    with pytest.raises(ValueError, match=message):
        planner._best_effort([apart])


def test_the_best_effort_placement_is_the_one_that_sustains_the_most(monkeypatch):
    # On 16 devices: tp5 (3.6 req/s a replica) fits 3 replicas, 10.8 req/s, 0.72 per device
    # used; tp4 (2.8 a replica) fits 4, 11.2 req/s, 0.70 per device. Asked for more than
    # either, the user gets the one that serves the most.
    inputs = PlanInputs(
        model=get_preset("opt-13b"),
        cluster=ClusterSpec(num_nodes=2, devices_per_node=8),
        workload=Workload.from_dataset("chat").sample(10, seed=0),
        slo=SLO(0.25, 0.1),
        profile=load_profile("a100-80g-distserve"),
        rate=50.0,
        show_progress=False,
    )
    planner = Planner(inputs)
    monkeypatch.setattr(
        Planner, "_predict", lambda self, cand, rate=None: cand.predicted.update(meets_target=True)
    )
    spec = planner._instance(Parallelism(1, 1), inputs.cluster.intra_link, 512)

    def colocated(tp: int, per_replica: float) -> Candidate:
        return Candidate(
            Algorithm.COLOCATED, Parallelism(tp, 1), None, 1, 0, per_replica, per_replica, spec
        )

    best = planner._best_effort([colocated(5, 3.6), colocated(4, 2.8)])
    assert best.prefill == Parallelism(4, 1) and best.num_prefill == 4
    assert best.goodput == pytest.approx(11.2)

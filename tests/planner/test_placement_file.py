"""The placement file carries the engine settings the plan assumed, round-trips them through
YAML, refuses malformed ones, and files written before they existed still load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from distserve_rt.config import PlacementKind
from distserve_rt.entrypoints.plan import _engine_settings
from distserve_rt.planner.placement_file import load_placement, placement_from_dict

OLD = {
    "model": "opt-13b",
    "placement": "disaggregated",
    "prefill": {"tp": 2, "pp": 1, "num_instances": 1},
    "decode": {"tp": 1, "pp": 1, "num_instances": 2},
    "cluster": {"num_nodes": 1, "devices_per_node": 8},
    "slo": {"ttft_s": 0.25, "tpot_s": 0.1, "target": 0.9},
    "predicted": {"goodput": 3.0},
}
ENGINE = {"max_num_batched_tokens": 1024, "max_num_seqs": 128, "gpu_memory_utilization": 0.85}


def test_engine_settings_round_trip_through_yaml(tmp_path):
    pf = placement_from_dict({**OLD, "engine": ENGINE})
    again = load_placement(pf.save(tmp_path / "p.yaml"))
    assert again.engine == ENGINE and again.to_dict() == pf.to_dict()
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["engine"] == ENGINE


def test_a_file_without_engine_settings_still_loads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(OLD))
    pf = load_placement(path)
    assert pf.engine == {} and pf.model == "opt-13b" and pf.decode.num_instances == 2


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"max_num_batched_tokens": 0}, "engine.max_num_batched_tokens must be a positive int"),
        ({"max_num_seqs": "lots"}, "engine.max_num_seqs must be a positive int, got 'lots'"),
        ({"gpu_memory_utilization": 1.5}, r"engine.gpu_memory_utilization must be in \(0, 1\]"),
        ({"dtype": 16}, "engine.dtype must be a string, got 16"),
        ({"speed": "fast"}, r"unknown engine keys \['speed'\]"),
        ([512], "engine must be a mapping"),
    ],
)
def test_malformed_engine_settings_are_refused(engine, message):
    with pytest.raises(ValueError, match=message):
        placement_from_dict({**OLD, "engine": engine})


@pytest.mark.parametrize(
    ("kind", "budget"), [(PlacementKind.DISAGGREGATED, 384), (PlacementKind.COLOCATED, 4096)]
)
def test_plan_writes_the_batch_budget_its_chosen_placement_was_simulated_with(kind, budget):
    inputs = SimpleNamespace(
        prefill_max_batch_tokens=384,
        colocated_max_batch_tokens=4096,
        cluster=SimpleNamespace(memory_utilization=0.8),
        dtype="float16",
    )
    settings = _engine_settings(inputs, SimpleNamespace(placement=kind))
    assert settings == {
        "max_num_batched_tokens": budget,
        "max_num_seqs": 256,
        "gpu_memory_utilization": 0.8,
        "dtype": "float16",
        "block_size": 16,
    }

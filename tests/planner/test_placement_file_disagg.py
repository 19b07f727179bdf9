"""The placement file's ``disagg`` section: the routing settings a multi-turn disaggregated
plan simulated (conditional disaggregation, decode-side cache, load cap). It round-trips,
files without it still load, malformed ones are refused in one line, and serve applies it
and refuses flags that contradict it, as for ``engine``."""

from __future__ import annotations

import pytest
import yaml

from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser
from distserve_rt.planner.placement_file import load_placement, placement_from_dict

BASE = {
    "model": "opt-13b",
    "placement": "disaggregated",
    "prefill": {"tp": 1, "pp": 1, "num_instances": 1},
    "decode": {"tp": 1, "pp": 1, "num_instances": 2},
    "cluster": {"num_nodes": 1, "devices_per_node": 4},
    "slo": {"ttft_s": 0.25, "tpot_s": 0.1, "target": 0.9},
    "predicted": {"goodput": 3.0},
}
DISAGG = {
    "decode_prefix_caching": True,
    "max_decode_load_imbalance": 2,
    "local_prefill_max_tokens": 256,
    "local_prefill_min_queue_tokens": 0,
}


def test_disagg_settings_round_trip_through_yaml(tmp_path):
    pf = placement_from_dict({**BASE, "disagg": DISAGG})
    again = load_placement(pf.save(tmp_path / "p.yaml"))
    assert again.disagg == DISAGG and again.to_dict() == pf.to_dict()
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["disagg"] == DISAGG


def test_a_file_without_disagg_settings_loads_and_writes_none(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(BASE))
    pf = load_placement(path)
    assert pf.disagg == {} and "disagg" not in pf.to_dict()


@pytest.mark.parametrize(
    ("disagg", "message"),
    [
        ({"local_prefill_max_tokens": -1}, "disagg.local_prefill_max_tokens must be an int >= 0"),
        ({"max_decode_load_imbalance": "2"}, "disagg.max_decode_load_imbalance must be an int"),
        ({"local_prefill_min_queue_tokens": True}, "must be an int >= 0, got True"),
        ({"decode_prefix_caching": "yes"}, "disagg.decode_prefix_caching must be true or false"),
        ({"transport": "shm"}, r"unknown disagg keys \['transport'\]; allowed: "),
        ([256], "disagg must be a mapping"),
        (0, "disagg must be a mapping"),
    ],
)
def test_malformed_disagg_settings_are_refused_in_one_line(disagg, message):
    with pytest.raises(ValueError, match=message) as err:
        placement_from_dict({**BASE, "disagg": disagg})
    assert len(str(err.value).splitlines()) == 1


def _serve(path, *flags: str):
    args = build_parser().parse_args(["serve", "--placement", str(path), *flags])
    return engine_args.configs_from_args(args)


def test_serve_applies_the_planned_routing_and_refuses_a_contradicting_flag(tmp_path):
    path = placement_from_dict({**BASE, "disagg": DISAGG}).save(tmp_path / "p.yaml")
    _, placement, disagg = _serve(path)
    assert placement.is_disaggregated
    assert disagg.local_prefill_max_tokens == 256 and disagg.max_decode_load_imbalance == 2
    _, _, disagg = _serve(path, "--local-prefill-max-tokens", "256")  # agrees: fine
    assert disagg.local_prefill_max_tokens == 256
    with pytest.raises(ValueError) as err:
        _serve(path, "--local-prefill-max-tokens", "64")
    assert str(err.value) == (
        "--local-prefill-max-tokens 64 but the placement file was planned with 256; drop the "
        "flag or plan again with that setting"
    )
    with pytest.raises(ValueError) as err:
        _serve(path, "--no-decode-prefix-caching")
    assert str(err.value).startswith(
        "--no-decode-prefix-caching but the placement file was planned with "
        "--decode-prefix-caching;"
    )


def test_serve_without_a_disagg_section_keeps_its_flags(tmp_path):
    path = placement_from_dict(BASE).save(tmp_path / "p.yaml")
    _, _, disagg = _serve(path, "--local-prefill-max-tokens", "64")
    assert disagg.local_prefill_max_tokens == 64 and disagg.decode_prefix_caching

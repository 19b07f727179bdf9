"""The dtype a plan is for: it sizes weights, KV capacity and KV transfer bytes, it is
checked against the dtype the profile was measured in, and the placement file carries it."""

from __future__ import annotations

import logging

import pytest
import yaml

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.entrypoints.cli import main
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.cluster import ClusterSpec, build_instance, kv_capacity, resolve_dtype
from distserve_rt.planner.profiles import load_profile


def test_auto_is_the_profiles_measured_dtype_else_bfloat16():
    distserve = load_profile("a100-80g-distserve")
    assert resolve_dtype("auto", distserve) == "float16"  # DistServe profiled fp16 OPT
    assert resolve_dtype(None, distserve) == "float16"
    distserve.measurement.pop("dtype", None)
    assert resolve_dtype("auto", distserve) == "bfloat16"
    assert resolve_dtype("float32", distserve) == "float32"
    with pytest.raises(ValueError, match="dtype must be one of .* got 'int8'"):
        resolve_dtype("int8", distserve)


def test_four_byte_weights_and_kv_leave_less_than_half_the_kv_room():
    model, par, cluster = get_preset("opt-13b"), Parallelism(2, 1), ClusterSpec()
    # Not A100-80GB (DistServe's fp16 table): the weights-left-over formula.
    two = kv_capacity(model, par, cluster, "h100", "bfloat16")
    four = kv_capacity(model, par, cluster, "h100", "float32")
    assert 0 < four < two / 2
    # DistServe's table is for its fp16 runs only.
    assert kv_capacity(model, par, cluster, "a100-80g", "float32") == four


def test_an_instance_for_another_dtype_than_profiled_is_warned(caplog):
    profile = load_profile("a100-80g-distserve")
    cluster = ClusterSpec()
    with caplog.at_level(logging.WARNING, logger="distserve_rt.planner.profiles"):
        build_instance(
            get_preset("opt-13b"), Parallelism(1, 1), cluster=cluster, profile=profile,
            stage_link=cluster.intra_link, max_batch_tokens=512, dtype="bfloat16",
        )  # fmt: skip
    assert "measured with dtype 'float16' and is used for dtype 'bfloat16'" in caplog.text


@pytest.mark.parametrize(
    ("flag", "written"), [([], "float16"), (["--dtype", "float32"], "float32")]
)
def test_the_placement_file_carries_the_plans_dtype_and_block_size(tmp_path, flag, written):
    out = tmp_path / "p.yaml"
    args = ["plan", "--model", "opt-13b", "--rate", "1", "--num-requests", "100"]
    args += ["--max-requests", "500", "--output", str(out), "--json", *flag]
    assert main(args) == 0
    engine = yaml.safe_load(out.read_text())["engine"]
    assert engine["dtype"] == written and engine["block_size"] == 16


def test_an_unknown_dtype_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--dtype", "int8"])
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err

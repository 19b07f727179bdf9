"""The user's questions of issue 15 answered end to end: `drt-run plan` writes a placement
file, `drt-run serve --placement FILE` accepts it, and (on CPU, the tiny model) the engine
built from it as serve builds it generates tokens."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from distserve_rt import SamplingParams
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser, main
from distserve_rt.planner.latency_model import FittedCoefficients
from distserve_rt.planner.placement_file import load_placement
from distserve_rt.planner.profiles import ProfileEntry, ProfileSet


def _plan(tmp_path, capsys, *flags: str) -> tuple[dict, object]:
    path = tmp_path / "placement.yaml"
    argv = ["plan", *flags, "--output", str(path), "--json", "--no-progress"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placement_file"] == str(path)
    return out, path


def _serve_configs(path, caplog):
    """What `drt-run serve --placement FILE` builds its engine from (its argument
    validation included: a file it refuses raises here)."""
    args = build_parser().parse_args(["serve", "--placement", str(path)])
    with caplog.at_level(logging.WARNING, logger="distserve_rt"):
        return args, engine_args.configs_from_args(args)


# "2 nodes x 8 GPUs, Llama-3-70B, chat, 10 req/s" (the question), and a rate the
# cluster cannot serve, which gets the best it can do.
_LLAMA_70B = [
    "--model",
    "llama-3-70b",
    "--num-nodes",
    "2",
    "--devices-per-node",
    "8",
    "--dataset",
    "chat",
    "--num-requests",
    "200",
    "--max-requests",
    "1000",
]


@pytest.mark.parametrize("rate", ["10", "40"])
def test_llama3_70b_on_2x8_gets_a_placement_file_serve_accepts(tmp_path, capsys, caplog, rate):
    out, path = _plan(tmp_path, capsys, *_LLAMA_70B, "--rate", rate)
    planned = load_placement(path)
    assert planned.model == "llama-3-70b" and planned.num_devices <= 16
    assert out["fits_cluster"] and planned.cluster["num_nodes"] == 2
    pred = planned.predicted
    assert pred["goodput_low"] <= pred["goodput"] <= pred["goodput_high"]
    if rate == "40":  # beyond 16 devices: the best they can do, and it says so
        assert out["best_effort"] and path.read_text().startswith("# best effort: sustains ")
        assert 0 < pred["sustained_rate"] < 40 and out["needed"]["num_devices"] > 16
    else:
        assert pred["meets_target"] and pred["goodput"] >= 10
    args, (config, placement, _) = _serve_configs(path, caplog)
    # serve runs what was planned: the placement, the model (random weights here, said
    # loudly) and the engine settings the simulation assumed.
    assert placement.kind.value == planned.placement
    if placement.is_disaggregated:
        for phase in ("prefill", "decode"):
            ours, theirs = getattr(placement, phase), getattr(planned, phase)
            assert (ours.tp, ours.pp, ours.num_instances) == (
                theirs.tp,
                theirs.pp,
                theirs.num_instances,
            )
    assert config.model == "dummy:llama-3-70b" and "random weights" in caplog.text
    for key, value in planned.engine.items():
        assert getattr(config, key) == value
    assert args.placement_file.to_dict() == planned.to_dict()


def _cpu_profile(tmp_path):
    """A CPU profile of dummy:llama-tiny, as `drt-run profile` would write one: a few ms a
    prefill step and about 1 ms a decode step."""
    coefficients = FittedCoefficients((2.0, 0.01, 0.0), (1.0, 0.0005, 0.02), (1.0, 0.0005, 0.02))
    profile = ProfileSet("cpu", [ProfileEntry("llama-tiny", 1, coefficients)], "test: synthetic")
    return profile.save(tmp_path / "cpu_profile.json")


@pytest.mark.parametrize(
    ("num_devices", "slo_ms", "kind"),
    [
        ("1", ("200", "50"), "colocated"),
        pytest.param("2", ("20", "5"), "disaggregated", marks=pytest.mark.slow),
    ],
)
def test_plan_then_serve_the_tiny_model_on_cpu(tmp_path, capsys, caplog, num_devices, slo_ms, kind):
    """One CPU device: colocated; two and SLOs that interference between the phases
    breaks: the plan disaggregates, and serve spawns a prefill and a decode process."""
    profile = _cpu_profile(tmp_path)
    out, path = _plan(
        tmp_path,
        capsys,
        *("--model", "llama-tiny", "--profile", str(profile), "--num-nodes", "1"),
        *("--devices-per-node", num_devices, "--device-memory-gib", "4"),
        *("--fixed-lengths", "16,8"),
        *("--slo-ttft-ms", slo_ms[0], "--slo-tpot-ms", slo_ms[1], "--rate", "5"),
        *("--num-requests", "100", "--max-requests", "500"),
    )
    assert not out["best_effort"] and out["placement"]["predicted"]["meets_target"]
    _, (config, placement, disagg) = _serve_configs(path, caplog)
    assert config.model == "dummy:llama-tiny" and placement.kind.value == kind
    args = build_parser().parse_args(["serve", "--placement", str(path)])
    engine = engine_args.build_engine_client(args)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        async def generate():
            final = None
            async for output in engine.generate("hello planner", params, "r0"):
                final = output
            return final

        final = asyncio.run(asyncio.wait_for(generate(), timeout=60))
    finally:
        engine.shutdown()
    assert final.finished and len(final.outputs[0].token_ids) == 4

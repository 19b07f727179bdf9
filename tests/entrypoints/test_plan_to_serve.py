"""The user's questions of issue 15 answered end to end: `drt-run plan` writes a placement
file, `drt-run serve --placement FILE` accepts it, and (on CPU, the tiny model) the engine
built from it as serve builds it generates tokens."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest
import yaml

from distserve_rt import SamplingParams
from distserve_rt.config.parallelism import Parallelism
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser, main
from distserve_rt.entrypoints.plan import placement_file
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.candidates import Algorithm, Candidate
from distserve_rt.planner.cluster import ClusterSpec
from distserve_rt.planner.latency_model import ConstantLatencyModel, FittedCoefficients
from distserve_rt.planner.placement import PlanInputs, PlanResult
from distserve_rt.planner.placement_file import load_placement
from distserve_rt.planner.profiles import ProfileEntry, ProfileSet, load_profile
from distserve_rt.planner.simulator import DisaggSpec, SimInstanceSpec
from distserve_rt.workloads import Workload


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
    else:  # e.g. "2 x colocated tp8": 2 replicas of TP 8, not one TP 1 engine
        replicas = planned.prefill
        assert (
            config.tensor_parallel_size,
            config.pipeline_parallel_size,
            config.data_parallel_size,
        ) == (replicas.tp, replicas.pp, replicas.num_instances)
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
    ("num_devices", "slo_ms", "rate", "deployment"),
    [
        ("1", ("200", "50"), "5", "1 x colocated (tp=1, pp=1)"),
        pytest.param("2", ("20", "5"), "5", "disaggregated", marks=pytest.mark.slow),
        # More than one TP 2 engine sustains: two replicas, each TP 2 (six processes).
        pytest.param(
            "4", ("200", "50"), "8000", "2 x colocated (tp=2, pp=1)", marks=pytest.mark.slow
        ),
    ],
)
def test_plan_then_serve_the_tiny_model_on_cpu(
    tmp_path, capsys, caplog, num_devices, slo_ms, rate, deployment
):
    """One CPU device: colocated; two and SLOs that interference between the phases
    breaks: the plan disaggregates, and serve spawns a prefill and a decode process; four
    and a rate one TP 2 engine cannot serve: serve runs two TP 2 replicas."""
    profile = _cpu_profile(tmp_path)
    out, path = _plan(
        tmp_path,
        capsys,
        *("--model", "llama-tiny", "--profile", str(profile), "--num-nodes", "1"),
        *("--devices-per-node", num_devices, "--device-memory-gib", "4"),
        *("--fixed-lengths", "16,8"),
        *("--slo-ttft-ms", slo_ms[0], "--slo-tpot-ms", slo_ms[1], "--rate", rate),
        *("--num-requests", "100", "--max-requests", "500"),
    )
    assert not out["best_effort"] and out["placement"]["predicted"]["meets_target"]
    _, (config, placement, disagg) = _serve_configs(path, caplog)
    assert config.model == "dummy:llama-tiny"
    if placement.is_disaggregated:
        assert deployment == "disaggregated"
    else:
        assert placement.describe() == deployment
    # A small KV pool per rank (not a planned setting): start-up maps less memory.
    argv = ["serve", "--placement", str(path), "--kv-cache-memory-bytes", "64MiB"]
    engine = engine_args.build_engine_client(build_parser().parse_args(argv))
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        async def generate(i: int):
            final = None
            async for output in engine.generate(f"hello planner {i}", params, f"r{i}"):
                final = output
            return final

        async def generate_all():  # as many at once as there are replicas
            num = config.data_parallel_size
            return await asyncio.gather(*(generate(i) for i in range(num)))

        finals = asyncio.run(asyncio.wait_for(generate_all(), timeout=120))
        instances = engine.stats().instances
    finally:
        engine.shutdown()
    assert all(f.finished and len(f.outputs[0].token_ids) == 4 for f in finals)
    if not placement.is_disaggregated:
        names = [f"colocated-{i}" for i in range(config.data_parallel_size)]
        assert [s.name for s in instances] == names and all(s.alive for s in instances)


def _colocated_file(tmp_path, tp: int, num_instances: int, model: str = "llama-tiny") -> str:
    raw = {
        "model": model,
        "placement": "colocated",
        "prefill": {"tp": tp, "pp": 1, "num_instances": num_instances},
    }
    path = tmp_path / "colocated.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_colocated_file_s_tp_and_replicas_become_the_engine_s(tmp_path, caplog):
    path = _colocated_file(tmp_path, tp=2, num_instances=3)
    _, (config, placement, _) = _serve_configs(path, caplog)
    assert (config.tensor_parallel_size, config.data_parallel_size) == (2, 3)
    assert placement.describe() == "3 x colocated (tp=2, pp=1)"
    # Flags agreeing with the file are accepted; the file through Python (LLM(placement=))
    # applies the same sizes (make_engine_core calls Placement.apply_to).
    args = build_parser().parse_args(["serve", "--placement", path, "-tp", "2", "-dp", "3"])
    assert engine_args.configs_from_args(args)[0] == config
    assert placement.apply_to(config.replace(tensor_parallel_size=1)) == config


@pytest.mark.parametrize("model", ["llama-tiny", "dummy:llama-tiny"])
def test_a_file_for_the_dummy_model_serves_the_dummy_model(tmp_path, caplog, model):
    path = _colocated_file(tmp_path, tp=1, num_instances=1, model=model)
    _, (config, _, _) = _serve_configs(path, caplog)
    assert config.model == "dummy:llama-tiny"  # was dummy:dummy:llama-tiny for the 2nd


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-tp", "1"], "--tensor-parallel-size 1 but the placement file was planned with 2"),
        (["-dp", "2"], "--data-parallel-size 2 but the placement file was planned with 3"),
        (["-pp", "2"], "--pipeline-parallel-size 2 but the placement file was planned with 1"),
    ],
)
def test_serve_refuses_a_flag_contradicting_a_colocated_file(tmp_path, flags, message):
    path = _colocated_file(tmp_path, tp=2, num_instances=3)
    with pytest.raises(SystemExit, match=f"^drt-run serve: {message}"):
        main(["serve", "--placement", path, *flags])


def test_plan_names_the_node_of_each_instance_and_serve_ray_takes_them(tmp_path, capsys, caplog):
    """Issue 10: 2 x 8 GPUs: the file says which node runs each instance (whole instances,
    at most 8 devices a node); `serve --launcher ray` places a disaggregated plan there and
    refuses a colocated one."""
    _, path = _plan(tmp_path, capsys, *_LLAMA_70B, "--rate", "10")
    planned = load_placement(path)
    nodes = planned.instance_nodes
    assert nodes is not None and set(nodes) <= {0, 1}
    phases = [planned.prefill] * planned.prefill.num_instances
    phases += [planned.decode] * planned.decode.num_instances if planned.decode else []
    for node in (0, 1):
        assert sum(p.tp * p.pp for p, n in zip(phases, nodes, strict=True) if n == node) <= 8
    args = build_parser().parse_args(["serve", "--placement", str(path), "--launcher", "ray"])
    if planned.placement == "disaggregated":
        assert engine_args.configs_from_args(args)[2].instance_nodes == nodes
    else:  # "2 x colocated tp8" here: not built on Ray, said before anything starts
        with pytest.raises(NotImplementedError, match="colocated engines on Ray"):
            engine_args.configs_from_args(args)


def test_an_algorithm_2_pair_over_2_nodes_is_written_aligned_and_serve_ray_takes_it(tmp_path):
    """Issue 10: the search's pair across 2 nodes (prefill tp4pp2 + decode tp2pp4, 4 + 4
    devices on each 8-device node) is written with a node per stage, stage k of both
    instances on the node of their common layer segment (the decode's 2 stages a node);
    the file round-trips and `serve --placement --launcher ray` runs that layout."""
    inputs = PlanInputs(
        model=get_preset("llama-3-70b"),
        cluster=ClusterSpec(num_nodes=2, devices_per_node=8),
        workload=Workload.from_dataset("chat").sample(10, seed=0),
        slo=SLO(0.25, 0.1),
        profile=load_profile("a100-80g-distserve"),
        rate=1.0,
        show_progress=False,
    )
    spec = SimInstanceSpec(ConstantLatencyModel(0.1, 0.01), 1000)
    pair = Candidate(
        Algorithm.PAIRS_IN_NODES, Parallelism(4, 2), Parallelism(2, 4), 1, 1, 2.0, 2.0,
        DisaggSpec(spec, spec, 1, 1), num_nodes_spanned=2,
    )  # fmt: skip
    planned = placement_file(
        SimpleNamespace(model="llama-3-70b"), PlanResult(inputs, pair, [pair], [])
    )
    assert planned.nodes == {"prefill": [[0, 1]], "decode": [[0, 0, 1, 1]]}
    path = planned.save(tmp_path / "placement.yaml")
    assert load_placement(path).to_dict() == planned.to_dict()
    args = build_parser().parse_args(["serve", "--placement", str(path), "--launcher", "ray"])
    _, placement, disagg = engine_args.configs_from_args(args)
    assert disagg.instance_nodes == ((0, 1), (0, 0, 1, 1))
    assert (placement.prefill.tp, placement.prefill.pp) == (4, 2)
    assert (placement.decode.tp, placement.decode.pp) == (2, 4)

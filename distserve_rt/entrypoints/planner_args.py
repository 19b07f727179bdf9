"""Flags shared by `drt-run simulate` and `drt-run plan`, and what they build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distserve_rt.entrypoints.engine_args import positive_float, positive_int
from distserve_rt.metrics.slo import SLO
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.presets import get_preset
from distserve_rt.planner.cluster import DTYPE_BYTES, ClusterSpec
from distserve_rt.workloads import (
    SLO_PRESETS,
    LengthDist,
    Workload,
    get_slo_preset,
    load_length_file,
)

DEFAULT_DATASET = "chat"
DEFAULT_NUM_REQUESTS = 300


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="opt-13b",
        help="model preset name (e.g. opt-13b, opt-175b) or a path to an HF config.json "
        "or to a directory holding one (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        default="a100-80g-distserve",
        help="latency profile: built-in a100-80g-distserve / a100-80g-vllm (DistServe's "
        "A100 fits) or a profile JSON file (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_BYTES],
        help="weights and KV dtype the plan is for (KV capacity, weight memory, KV transfer "
        "bytes); auto: the dtype the profile was measured in (DistServe's A100 profiles: "
        "float16), else bfloat16 (default: auto)",
    )
    # One source of lengths: a flag that would be ignored is refused instead.
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument(
        "--dataset",
        help="request lengths: sharegpt|chat, humaneval|code, longbench, "
        f"summarization (default: {DEFAULT_DATASET}); plan and simulate also take "
        "multi-turn (ShareGPT-length conversations, closed loop, with the prefix cache; "
        "rates are then conversations/s)",
    )
    lengths.add_argument(
        "--fixed-lengths",
        metavar="PROMPT,OUTPUT",
        help="synthetic workload: every request has these prompt/output token counts",
    )
    lengths.add_argument(
        "--dataset-path",
        metavar="FILE",
        help="request lengths from your file, sampled like --dataset: JSONL (one object a "
        "line) or CSV (a header line) with prompt_len|prompt_tokens and "
        "output_len|output_tokens; an arrival_s|timestamp column is an arrival trace that "
        "`simulate --use-arrivals` replays (plan searches rates, so it uses the lengths only)",
    )
    p.add_argument(
        "--num-requests",
        type=positive_int,
        help=f"requests simulated per rate, sampled from the dataset (default: "
        f"{DEFAULT_NUM_REQUESTS}; with --use-arrivals, the whole trace); plan screens with "
        "them, then simulates its best candidates until their estimates are stable",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling and arrival seed (default: 0)")
    p.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="arrival burstiness: 1 = Poisson, else gamma with this CV (default: 1)",
    )
    add_slo_args(p)
    p.add_argument(
        "--target",
        type=float,
        default=0.9,
        help="SLO attainment target, 0..1 (default: %(default)s)",
    )
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--devices-per-node", type=int, default=8, help="devices per node (default: 8)")
    p.add_argument(
        "--device-memory-gib", type=float, default=80.0, help="memory per device, GiB (default: 80)"
    )
    p.add_argument(
        "--intra-node-gbps",
        type=float,
        default=300.0,
        help="per-device link inside a node, GB/s (default: 300, NVLink A100)",
    )
    p.add_argument(
        "--inter-node-gbps",
        type=float,
        default=25.0,
        help="per-device network across nodes, GB/s (default: 25 = 200 Gb/s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


DEFAULT_SLO = SLO(0.25, 0.1)
"""TTFT 250 ms, TPOT 100 ms: DistServe's chatbot OPT-13B SLOs, also `drt-run bench`'s."""


def add_slo_args(p: argparse.ArgumentParser) -> None:
    """The SLO flags, spelled and scaled as `drt-run bench` spells them (milliseconds, like
    `vllm bench serve --goodput ttft:MS`), so one number means one thing in every command."""
    p.add_argument(
        "--slo-preset",
        choices=sorted(SLO_PRESETS),
        help="the paper's Table 1 SLOs; --slo-ttft-ms/--slo-tpot-ms override either one",
    )
    p.add_argument(
        "--slo-ttft-ms",
        type=positive_float,
        help=f"TTFT SLO, ms (default: the preset's, else {DEFAULT_SLO.ttft_s * 1e3:g})",
    )
    p.add_argument(
        "--slo-tpot-ms",
        type=positive_float,
        help=f"TPOT SLO, ms (default: the preset's, else {DEFAULT_SLO.tpot_s * 1e3:g})",
    )
    # The old flags took seconds: refused, not dropped, so `--ttft 400` (which used to mean
    # 400 s) fails naming its replacement instead of argparse's bare "unrecognized".
    for old, new in (("--ttft", "--slo-ttft-ms"), ("--tpot", "--slo-tpot-ms")):
        p.add_argument(old, action=_Renamed, new=new, help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """A removed seconds flag: the parser error names its milliseconds replacement."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            example = f"; {option_string} {values} would be {self.new} {float(values) * 1e3:g}"
        except ValueError:
            example = ""
        parser.error(f"{option_string} is now {self.new} (milliseconds){example}")


def load_model(spec: str) -> ModelConfig:
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_hf_config(json.loads(path.read_text()), name=spec)
    return get_preset(spec)


def build_workload(args) -> Workload:
    """The requests' lengths: ``--num-requests`` of them, sampled (``--seed``) from the
    dataset or the file, or all alike with ``--fixed-lengths``."""
    num_requests = args.num_requests or DEFAULT_NUM_REQUESTS
    if args.fixed_lengths:
        try:
            prompt, output = (int(x) for x in args.fixed_lengths.split(","))
        except ValueError:
            raise ValueError(
                f"--fixed-lengths must be PROMPT,OUTPUT, got {args.fixed_lengths!r}"
            ) from None
        return Workload.synthetic(
            num_requests, LengthDist("fixed", prompt), LengthDist("fixed", output)
        )
    if args.dataset_path:
        dataset = load_length_file(args.dataset_path).workload()
    else:
        dataset = Workload.from_dataset(args.dataset or DEFAULT_DATASET)
    return dataset.sample(num_requests, seed=args.seed)


def build_pool(args) -> Workload | None:
    """What the planner's stable estimates draw requests from: the whole dataset or file
    (`build_workload` samples a few hundred of it for the screen); None for
    ``--fixed-lengths``, where every request is alike."""
    if args.fixed_lengths:
        return None
    if args.dataset_path:
        return load_length_file(args.dataset_path).workload()
    return Workload.from_dataset(args.dataset or DEFAULT_DATASET)


def build_trace(args) -> tuple[Workload, np.ndarray]:
    """``--dataset-path``'s requests in file order and their arrival times (s, float64
    ``[num_requests]``, from 0): the first ``--num-requests`` rows, else all of them."""
    if not args.dataset_path:
        raise ValueError("--use-arrivals replays the arrival column of --dataset-path FILE")
    return load_length_file(args.dataset_path).trace(args.num_requests)


def build_slo(args) -> SLO:
    """The SLOs in seconds (the simulator's unit) from the millisecond flags."""
    base = get_slo_preset(args.slo_preset).slo if args.slo_preset else DEFAULT_SLO
    ttft = base.ttft_s if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3
    tpot = base.tpot_s if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3
    return SLO(ttft, tpot)


def build_cluster(args) -> ClusterSpec:
    return ClusterSpec(
        args.num_nodes,
        args.devices_per_node,
        args.device_memory_gib,
        args.intra_node_gbps,
        args.inter_node_gbps,
    )

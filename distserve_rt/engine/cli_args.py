"""The engine's command-line flags (`drt-run generate`, and `drt-run serve` / `bench` through
`entrypoints.engine_args`) and the configs built from them."""

from __future__ import annotations

import argparse
from typing import Any

from distserve_rt.engine.config import EngineConfig, GiB
from distserve_rt.engine.placement import DisaggConfig, PhaseConfig, Placement


def add_engine_args(g: argparse._ActionsContainer) -> None:
    """Adds the model, engine and placement flags to a parser or argument group."""
    g.add_argument("--model", default="dummy:llama-tiny", help="HF directory or dummy:<preset>")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights and sampling")
    g.add_argument(
        "--policy", default="continuous_batching",
        help="colocated scheduling: continuous_batching or chunked_prefill",
    )  # fmt: skip
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--kv-cache-memory-gib", type=float, default=1.0, help="CPU: KV pool GiB per instance"
    )
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests holding KV at most")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="tokens per step at most (the prefill budget L_m when disaggregated)",
    )  # fmt: skip
    g.add_argument("--max-model-len", type=int, default=None, help="context length")
    g.add_argument(
        "--placement", default="colocated",
        help="colocated, disaggregated, or a placement YAML file (drt-run plan writes one)",
    )  # fmt: skip
    for phase in ("prefill", "decode"):
        g.add_argument(f"--num-{phase}-instances", type=int, default=None, help=f"{phase} count")
        g.add_argument(f"--{phase}-tp", type=int, default=None, help=f"{phase} TP per instance")
        g.add_argument(f"--{phase}-pp", type=int, default=None, help=f"{phase} PP per instance")
    g.add_argument(
        "--cpu-cores-per-instance", type=int, default=1, help="CPU: cores each instance gets"
    )
    g.add_argument("--no-pin-cpus", action="store_true", help="do not pin instances to cores")
    g.add_argument(
        "--kv-lease-timeout-s", type=float, default=30.0,
        help="seconds a prefilled KV may wait for a decode instance to pull it",
    )  # fmt: skip
    g.add_argument("--on-lease-expiry", choices=("fail", "retry"), default="fail")
    g.add_argument(
        "--retry-on-instance-failure", action="store_true",
        help="re-prefill the requests of a dead instance on a live one",
    )  # fmt: skip


def configs_from_args(args: Any) -> tuple[EngineConfig, Placement, DisaggConfig]:
    """EngineConfig, Placement and DisaggConfig from flags of `add_engine_args`."""
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        policy=args.policy, block_size=args.block_size,
        kv_cache_memory_bytes=int(args.kv_cache_memory_gib * GiB),
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )  # fmt: skip
    placement = _placement(args)
    disagg = DisaggConfig(
        kv_lease_timeout_s=args.kv_lease_timeout_s,
        on_lease_expiry=args.on_lease_expiry,
        retry_on_instance_failure=args.retry_on_instance_failure,
        pin_cpus=not args.no_pin_cpus,
    )
    return config, placement, disagg


def _placement(args: Any) -> Placement:
    placement = Placement.parse(args.placement)
    overrides = {
        phase: {
            key: getattr(args, f"{flag}")
            for key, flag in (
                ("num_instances", f"num_{phase}_instances"),
                ("tp", f"{phase}_tp"),
                ("pp", f"{phase}_pp"),
            )
            if getattr(args, flag) is not None
        }
        for phase in ("prefill", "decode")
    }
    if not placement.is_disaggregated:
        if any(overrides.values()):
            raise ValueError(
                "--num-*-instances, --*-tp and --*-pp need --placement disaggregated (or a "
                f"disaggregated placement file), got --placement {args.placement}"
            )
        return placement
    phases = []
    for name in ("prefill", "decode"):
        base: PhaseConfig = getattr(placement, name)
        fields = {"tp": base.tp, "pp": base.pp, "num_instances": base.num_instances}
        fields.update(overrides[name])
        phases.append(PhaseConfig(**fields, cpu_cores=args.cpu_cores_per_instance))
    return Placement.disaggregated(*phases)

"""`drt-run profile`: measure prefill/decode step times here, fit the latency model, save it.

The saved JSON is a latency profile (`distserve_rt.planner.profiles`): pass it to
``drt-run simulate --profile`` or ``drt-run plan --profile``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from distserve_rt import _native
from distserve_rt.benchmarks.environment import environment, hardware_name
from distserve_rt.planner.profiler import ProfileGrid, fit_profile, measure
from distserve_rt.planner.step_timer import STEP_INCLUDES, RunnerStepTimer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        description=__doc__,
    )
    p.add_argument(
        "--model",
        default="dummy:llama-tiny",
        help="a local HF directory or dummy:<preset> (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV dtype; auto = the checkpoint's (float32 for dummy on CPU)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch and the native kernels (default: torch's current count)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="largest batch of both grids, requests (default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="most prompt tokens in one prefill batch, L_m (default: %(default)s)",
    )
    p.add_argument(
        "--max-context-len",
        type=int,
        default=1024,
        help="longest decode context, tokens (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per grid point; the median is kept (default: %(default)s)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per grid point (default: 1)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default: 16)")
    p.add_argument(
        "--decode-threshold",
        type=int,
        default=95,
        help="batch size from which the large-batch decode fit applies (default: 95)",
    )
    p.add_argument(
        "--analytic", action="store_true", help="also fit the paper's analytic form (C1..C6)"
    )
    p.add_argument(
        "--output",
        help="profile JSON to write (default: profile_<model>_<device>.json here)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the profile as JSON instead of a summary"
    )
    p.set_defaults(handler=run)


def _load(args):
    from distserve_rt.models import load_model

    model, config = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, config


def run(args) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads!r}")
        torch.set_num_threads(args.threads)
        _native.set_num_threads(args.threads)
    grid = ProfileGrid(args.max_batch_size, args.max_tokens, args.max_context_len)
    model, config = _load(args)
    timer = RunnerStepTimer(
        model,
        num_blocks=grid.max_kv_tokens // args.block_size + grid.max_batch_size + 1,
        block_size=args.block_size,
        max_num_batched_tokens=max(grid.max_tokens, grid.max_batch_size),
        max_num_seqs=grid.max_batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    samples = measure(grid, timer, lambda pts: tqdm(pts, desc="profile", unit="step"))
    dtype = str(timer.kv_pool.dtype).removeprefix("torch.")
    env = environment()
    measurement = {
        "device": str(timer.device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "block_size": args.block_size,
        "includes": list(STEP_INCLUDES),
        "repeats": args.repeats,
        "statistic": "median",
        "grid": grid.to_dict(),
        "date": env["date"],
        "git_commit": env["git_commit"],
        "samples": samples.to_dict(),
    }
    profile = fit_profile(
        samples,
        config,
        hardware=hardware_name(timer.device),
        decode_threshold=args.decode_threshold,
        analytic=args.analytic,
        source=f"drt-run profile --model {args.model}",
        measurement=measurement,
    )
    default = f"profile_{config.name}_{timer.device.type}.json"
    path = profile.save(Path(args.output or default))
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    _print_summary(profile, path)
    return 0


def _print_summary(profile, path: Path) -> None:
    entry = profile.entries[0]
    m = profile.measurement
    print(
        f"{entry.model} tp={entry.tp} on {profile.hardware} ({m['device']}, {m['dtype']}, "
        f"{m['threads']} threads); step = {' + '.join(m['includes'])}"
    )
    co = entry.coefficients
    print(f"  prefill      a, b, c (ms) = {_fmt(co.prefill)}")
    print(f"  decode_small a, b, c (ms) = {_fmt(co.decode_small)}")
    if co.decode_large != co.decode_small:
        print(f"  decode_large a, b, c (ms) = {_fmt(co.decode_large)}")
    errors = dict(entry.fit_error)
    errors.update({f"analytic {k}": v for k, v in profile.analytic_fit_error.items()})
    for name, err in errors.items():
        print(
            f"  fit error {name:<17} mean {err.mean_rel:6.1%}  max {err.max_rel:6.1%}  "
            f"({err.num_samples} samples)"
        )
    print(f"saved {path}")


def _fmt(triple) -> str:
    return ", ".join(f"{x:.4g}" for x in triple)

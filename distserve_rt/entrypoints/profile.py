"""`drt-run profile`: measure step times here, fit the latency model, save it.

By default a synthetic workload runs through the real engine (colocated, ``--policy``,
``--tp``) and the model is fitted from the steps it executed: the whole step with the
host's share, chunked prefill's mixed steps, the median per batch shape over ``--repeats``
runs of the same workload, with the error on held-out batch shapes and the step-time
distribution. ``--isolated`` times single steps of a grid instead (no scheduler, no host).

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
from distserve_rt.entrypoints.engine_args import memory_size
from distserve_rt.planner.profiler import ProfileGrid, fit_engine_profile, fit_profile, measure
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
        "--tp",
        type=int,
        default=1,
        help="tensor parallel degree of the profiled instance (default: 1)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline parallel degree of the profiled instance; only 1 is profiled (default: 1)",
    )
    p.add_argument(
        "--isolated",
        action="store_true",
        help="time single steps over a grid (the --max-batch-size/--max-tokens/"
        "--max-context-len flags) instead of the running engine's steps",
    )
    e = p.add_argument_group("engine workload (the default mode)")
    e.add_argument(
        "--policy",
        default="chunked_prefill",
        choices=["chunked_prefill", "continuous_batching"],
        help="the engine's batching policy (default: %(default)s)",
    )
    e.add_argument(
        "--num-steps",
        type=int,
        default=600,
        help="engine steps with arrivals per repeat (default: %(default)s)",
    )
    e.add_argument(
        "--max-prompt-len", type=int, default=1024, help="longest prompt (default: 1024)"
    )
    e.add_argument("--max-output-len", type=int, default=128, help="longest output (default: 128)")
    e.add_argument(
        "--max-num-seqs", type=int, default=64, help="the engine's batch limit (default: 64)"
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="the engine's token budget per step (default: the policy's, as in serve)",
    )
    e.add_argument(
        "--kv-cache-memory-bytes",
        type=memory_size,
        metavar="SIZE",
        help="CPU: bytes of the engine's KV pool (default: EngineConfig's, as in serve)",
    )
    e.add_argument(
        "--warmup-steps", type=int, default=20, help="unrecorded first steps (default: 20)"
    )
    e.add_argument(
        "--held-out",
        type=float,
        default=0.2,
        help="share of batch shapes kept out of the fit to measure its error (default: 0.2)",
    )
    e.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
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
        help="timed runs per grid point, or runs of the engine workload; the median per "
        "batch shape is kept (default: %(default)s)",
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


def _check_parallel(args) -> None:
    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)!r}")
    if args.pp > 1:
        raise ValueError(
            f"--pp {args.pp} is not supported: a pipelined engine overlaps {args.pp} batches, so "
            f"no step time is one batch's; profile --pp 1 (the planner splits stages itself)"
        )
    if args.isolated and args.tp > 1:
        raise ValueError(
            f"--isolated times one process and cannot run --tp {args.tp}; drop --isolated to "
            f"profile the tensor-parallel engine"
        )


def run(args) -> int:
    _check_parallel(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads!r}")
        torch.set_num_threads(args.threads)
        _native.set_num_threads(args.threads)
    profile = _run_isolated(args) if args.isolated else _run_engine(args)
    m = profile.measurement
    default = f"profile_{m['model']}_{torch.device(args.device).type}.json"
    path = profile.save(Path(args.output or default))
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    _print_summary(profile, path)
    return 0


def _where(args, model: str, dtype: str) -> dict[str, object]:
    """Where the profile was measured (`ProfileSet.check_use` compares against it)."""
    env = environment()
    return {
        "hardware": hardware_name(args.device),
        "model": model,
        "dtype": dtype,
        "tp": args.tp,
        "pp": args.pp,
        "device": str(torch.device(args.device)),
        "threads": torch.get_num_threads(),
        "block_size": args.block_size,
        "date": env["date"],
        "git_commit": env["git_commit"],
    }


def _run_isolated(args):
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
    measurement = _where(args, config.name, str(timer.kv_pool.dtype).removeprefix("torch."))
    measurement.update(
        mode="isolated",
        includes=list(STEP_INCLUDES),
        repeats=args.repeats,
        statistic="median",
        grid=grid.to_dict(),
        samples=samples.to_dict(),
    )
    return fit_profile(
        samples,
        config,
        hardware=hardware_name(timer.device),
        decode_threshold=args.decode_threshold,
        analytic=args.analytic,
        source=f"drt-run profile --isolated --model {args.model}",
        measurement=measurement,
    )


def _run_engine(args):
    from distserve_rt.benchmarks.engine_profile import EngineWorkload, record_engine_steps
    from distserve_rt.config import EngineConfig
    from distserve_rt.engine.llm_engine import LLMEngine

    if args.analytic:
        raise ValueError("--analytic fits isolated steps; use it with --isolated")
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        policy=args.policy,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tp,
        log_stats_interval_s=0,
        # A profile times full prompts: the workload's repeats would hit the prefix cache.
        enable_prefix_caching=False,
    )
    if args.kv_cache_memory_bytes is not None:
        config = config.replace(kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    engine = LLMEngine(config)
    try:
        model = engine.model_config
        max_len = engine.scheduler_config.max_model_len
        workload = EngineWorkload(
            args.num_steps,
            max(1, min(args.max_prompt_len, max_len - args.max_output_len - 1)),
            args.max_output_len,
            2 * args.max_num_seqs,
            args.seed,
        )
        records = record_engine_steps(
            engine,
            workload,
            repeats=args.repeats,
            warmup_steps=args.warmup_steps,
            progress=lambda steps: tqdm(steps, desc="profile", unit="step"),
        )
    finally:
        engine.shutdown()
    measurement = _where(args, model.name, _dtype_name(args))
    kinds = [r.shape.kind for r in records]
    measurement.update(
        mode="engine",
        policy=args.policy,
        includes=["schedule", "execute", "postprocess"],
        repeats=args.repeats,
        statistic="median per batch shape, scaled to the mean step",
        workload={k: getattr(workload, k) for k in workload.__dataclass_fields__},
        num_steps={k: kinds.count(k) for k in ("prefill", "decode", "mixed")},
    )
    return fit_engine_profile(
        records,
        model,
        hardware=hardware_name(args.device),
        tp=args.tp,
        decode_threshold=args.decode_threshold,
        held_out=args.held_out,
        source=f"drt-run profile --model {args.model} --policy {args.policy} --tp {args.tp}",
        measurement=measurement,
    )


def _dtype_name(args) -> str:
    from distserve_rt.models.loader import resolve_dtype

    hf_config = None
    if not args.model.startswith("dummy:"):
        hf_config = json.loads((Path(args.model) / "config.json").read_text())
    return str(resolve_dtype(args.dtype, hf_config, args.device)).removeprefix("torch.")


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
    if co.mixed is not None:
        print(f"  mixed     a, b, c, d (ms) = {_fmt(co.mixed)}")
    if co.overhead:
        print(f"  overhead per step    (ms) = {co.overhead:.4g}")
    if co.decode_batch_factors:
        rows = ", ".join(f"B>={size}: {f:.3f}" for size, f in co.decode_batch_factors)
        print(f"  decode x by batch size    = {rows}")
    errors = {f"fit error {k}": v for k, v in entry.fit_error.items()}
    errors.update({f"fit error analytic {k}": v for k, v in profile.analytic_fit_error.items()})
    errors.update({f"held-out {k}": v for k, v in entry.held_out_error.items()})
    for name, err in errors.items():
        p90 = "" if err.p90_rel is None else f"  p90 {err.p90_rel:6.1%}"
        print(
            f"  {name:<27} mean {err.mean_rel:6.1%}{p90}  max {err.max_rel:6.1%}  "
            f"({err.num_samples} steps)"
        )
    for kind, noise in entry.step_noise.items():
        q = noise.quantiles
        print(
            f"  step time / model {kind:<8} p10 {q[2]:.2f}  p50 {q[10]:.2f}  p90 {q[18]:.2f}"
            f"  autocorrelation {noise.autocorrelation:.2f}  replays {len(noise.sequence)} steps"
            if len(q) == 21
            else f"  step time / model {kind}: {len(q)} quantiles"
        )
    print(f"saved {path}")


def _fmt(triple) -> str:
    return ", ".join(f"{x:.4g}" for x in triple)

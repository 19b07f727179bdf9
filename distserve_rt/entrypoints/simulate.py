"""`drt-run simulate`: one configuration at one or more rates.

Two simulators: ``scheduler`` (the default where it applies, pp=1) drives the runtime's own
`core` schedulers on a simulated clock, so admission on the prompt above the watermark,
budgets and preemption are the runtime's; ``fast`` re-states the policies analytically
(reserving prompt + output tokens, never preempting) and also covers PP.
"""

from __future__ import annotations

import json

import numpy as np

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.entrypoints import planner_args, simulate_multi_turn
from distserve_rt.entrypoints.engine_args import positive_float, positive_int
from distserve_rt.planner.cluster import (
    DoesNotFitError,
    build_instance,
    dtype_bytes,
    resolve_dtype,
)
from distserve_rt.planner.distserve_modelling import (
    distserve_colocated_spec,
    distserve_disagg_spec,
)
from distserve_rt.planner.goodput import GoodputEvaluator
from distserve_rt.planner.instance_timing import kv_transfer_s
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    DisaggSpec,
    KVTransferSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimResult,
)
from distserve_rt.workloads import Workload


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", description=__doc__)
    planner_args.add_common(p)
    p.add_argument(
        "--placement",
        choices=["disaggregated", "colocated"],
        default="disaggregated",
        help="disaggregated prefill/decode instances or one colocated instance",
    )
    p.add_argument(
        "--policy",
        choices=[x.value for x in ColocatedPolicy],
        default="continuous_batching",
        help="colocated scheduling policy",
    )
    p.add_argument(
        "--prefill-tp", type=positive_int, default=1, help="prefill (or colocated) TP degree"
    )
    p.add_argument("--prefill-pp", type=positive_int, default=1, help="prefill PP degree")
    p.add_argument("--decode-tp", type=positive_int, default=1, help="decode TP degree")
    p.add_argument("--decode-pp", type=positive_int, default=1, help="decode PP degree")
    p.add_argument("--num-prefill", type=positive_int, default=1, help="prefill instances")
    p.add_argument("--num-decode", type=positive_int, default=1, help="decode instances")
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=None,
        help="prefill batch budget L_m; colocated: per-step token budget (default 512; "
        "colocated continuous_batching with --simulator scheduler: max(longest request, "
        "2048), the runtime's default, which never splits a prompt)",
    )
    p.add_argument(
        "--simulator",
        choices=SIMULATORS,
        default=None,
        help="scheduler: the runtime's core schedulers on a simulated clock (pp=1 only); "
        "fast: the analytic policies, reserving prompt+output KV (covers PP). Default: "
        "scheduler when every instance has pp=1, else fast",
    )
    p.add_argument(
        "--no-step-noise",
        action="store_true",
        help="time every step at the profile's fit; by default the scheduler simulator draws "
        "each step's time from the spread the profile measured around it (profiles made by "
        "drt-run profile; DistServe's have none)",
    )
    p.add_argument(
        "--kv-link",
        choices=["intra", "inter"],
        default="intra",
        help="link the KV cache crosses: NVLink inside a node or the network",
    )
    p.add_argument(
        "--modelling",
        choices=["ours", "distserve"],
        default="ours",
        help="distserve: DistServe's simulator's modelling choices, to compare with its numbers "
        "(2 ms + 0.1 us/context token per step, prefill batches up to its KV capacity table, "
        "free KV transfer, t/pp + pp ms prefill stages, no decode memory limit; "
        "--max-batch-tokens, --kv-link and the memory flags then do not apply; see "
        "planner/distserve_modelling.py)",
    )
    p.add_argument(
        "--rates",
        type=positive_float,
        nargs="+",
        help="request rates to simulate, req/s (default: 1.0); not with --use-arrivals",
    )
    p.add_argument(
        "--use-arrivals",
        action="store_true",
        help="replay --dataset-path's arrival_s|timestamp column (its first --num-requests "
        "rows, else all) instead of Poisson/gamma arrivals at --rates; refuses --rates and "
        "--cv: a trace has its own rate and burstiness, and a rate that rescaled its times "
        "would make one flag mean two things",
    )
    simulate_multi_turn.add_args(p)
    p.set_defaults(handler=run)


SIMULATORS = ("scheduler", "fast")


def _instance(model, parallelism, flags: str, max_seq_len: int, **kw):
    """build_instance, refusing (with the flags that would help) an instance that cannot hold
    the longest request: simulated, it would only report 0% attainment and NaN latencies."""
    hint = f"try a larger {flags} or --device-memory-gib"
    try:
        spec = build_instance(model, parallelism, **kw)
    except DoesNotFitError as exc:
        raise DoesNotFitError(f"{exc}; {hint}") from None
    if spec.kv_capacity_tokens < max_seq_len:
        raise DoesNotFitError(
            f"{model.name} tp={parallelism.tp_size}, pp={parallelism.pp_size} holds "
            f"{spec.kv_capacity_tokens} KV tokens, the longest request needs {max_seq_len}; "
            f"{hint}"
        )
    return spec


def _simulator(args) -> str:
    """The simulator to run: the flag's, else scheduler unless an instance has pp > 1 or
    DistServe's modelling is asked for (its simulator reserves no KV and never preempts:
    the fast simulator's semantics, with which its numbers are reproduced)."""
    if args.modelling == "distserve":
        if args.simulator == "scheduler":
            raise ValueError(
                "--simulator scheduler and --modelling distserve are exclusive: DistServe's "
                "modelling has no KV limit on decode, the runtime's schedulers do; use "
                "--simulator fast"
            )
        return "fast"
    pps = [1] if args.placement == "colocated" else [args.prefill_pp, args.decode_pp]
    if args.simulator is None:
        return "scheduler" if max(pps) == 1 else "fast"
    if args.simulator == "scheduler" and max(pps) > 1:
        raise ValueError(
            f"--simulator scheduler supports pp=1 only, got --prefill-pp {args.prefill_pp} "
            f"--decode-pp {args.decode_pp}; use --simulator fast for PP"
        )
    return args.simulator


def _max_batch_tokens(args, simulator: str, max_seq_len: int) -> int:
    """--max-batch-tokens, else the default of the runtime this simulates."""
    if args.max_batch_tokens is not None:
        return args.max_batch_tokens
    if simulator == "scheduler" and _is_cb(args):
        return max(max_seq_len, 2048)  # EngineConfig.scheduler_config's default
    return 512


def _is_cb(args) -> bool:
    return args.placement == "colocated" and args.policy == "continuous_batching"


def _spec(args, model, profile, cluster, max_seq_len: int, max_batch_tokens: int):
    if args.modelling == "distserve":
        return _distserve_spec(args, model, profile)
    dtype = resolve_dtype(args.dtype, profile)
    kw = dict(
        cluster=cluster,
        profile=profile,
        max_batch_tokens=max_batch_tokens,
        max_seq_len=max_seq_len,
        dtype=dtype,
    )
    if args.placement == "colocated":
        colocated = Parallelism(args.prefill_tp, 1)
        return _instance(model, colocated, "--prefill-tp", stage_link=cluster.intra_link, **kw)
    link = cluster.intra_link if args.kv_link == "intra" else cluster.inter_link
    pre_par = Parallelism(args.prefill_tp, args.prefill_pp)
    dec_par = Parallelism(args.decode_tp, args.decode_pp)
    pre = _instance(model, pre_par, "--prefill-tp/--prefill-pp", stage_link=link, **kw)
    dec = _instance(model, dec_par, "--decode-tp/--decode-pp", stage_link=link, **kw)
    streams = min(pre.num_devices, dec.num_devices)
    one_token = kv_transfer_s(model, 1, link, streams, dtype_bytes(dtype)) - link.latency_s
    kv = KVTransferSpec(one_token, link.latency_s)
    return DisaggSpec(pre, dec, args.num_prefill, args.num_decode, kv)


def _distserve_spec(args, model, profile):
    if args.placement == "colocated" and args.policy != ColocatedPolicy.CONTINUOUS_BATCHING:
        # Its vLLM baseline never chunks prefills: a chunked run would compare with nothing.
        raise ValueError(
            f"--policy must be continuous_batching with --modelling distserve, got {args.policy}"
        )
    if args.placement == "colocated":
        return distserve_colocated_spec(model, profile, Parallelism(args.prefill_tp, 1))
    prefill = Parallelism(args.prefill_tp, args.prefill_pp)
    decode = Parallelism(args.decode_tp, args.decode_pp)
    return distserve_disagg_spec(model, profile, prefill, decode, args.num_prefill, args.num_decode)


_SIMULATOR_TEXT = {
    "scheduler": "scheduler (the runtime's core schedulers on a simulated clock)",
    "fast": "fast (analytic policies, prompt+output KV reserved, no preemption)",
}


def _process(cv: float) -> str:
    return "poisson" if cv == 1.0 else f"gamma(cv={cv:g})"


def _rate_text(rate: float | None) -> str:
    return f"{'burst':>8}" if rate is None else f"{rate:8.3f}"


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad input the flags' types cannot see (e.g. the model)
        raise SystemExit(f"drt-run simulate: {exc}") from None


def _requests(args) -> tuple[Workload, list[tuple[float | None, np.ndarray | None]]]:
    """The requests, and each run's (rate shown, arrival times): the --rates with Poisson or
    gamma arrivals (None), or, with --use-arrivals, the trace's own once (its rate None
    when all its requests arrive at once)."""
    if not args.use_arrivals:
        return planner_args.build_workload(args), [(rate, None) for rate in args.rates or [1.0]]
    if args.rates:
        raise ValueError("--rates and --use-arrivals are exclusive: the trace sets the rate")
    if args.cv != 1.0:
        raise ValueError("--cv and --use-arrivals are exclusive: the trace sets the burstiness")
    workload, arrival_s = planner_args.build_trace(args)
    # The trace's mean rate over its span, shown where a --rates run shows its rate.
    span = float(arrival_s[-1])
    rate = (workload.num_requests - 1) / span if span > 0 else None
    return workload, [(rate, arrival_s)]


def _step_noise(args, simulator: str, profile, model):
    """The profile's measured step-time spread per step kind (`KindNoise`) for the
    scheduler-driven simulator, or None: off by flag, the fast simulator (closed-form
    steps), or a profile that measured none (DistServe's fits, isolated-step profiles)."""
    if simulator != "scheduler" or args.no_step_noise:
        return None
    tps = [args.prefill_tp] if args.placement == "colocated" else [args.prefill_tp, args.decode_tp]
    return next((n for tp in tps if (n := profile.step_noise_by_kind(model, tp)) is not None), None)


def _simulate(
    args, simulator: str, spec, evaluator: GoodputEvaluator, arrival_s, noise=None
) -> SimResult:
    """One run of `spec` with the workload's requests arriving at ``arrival_s`` (s)."""
    policy = ColocatedPolicy(args.policy) if args.placement == "colocated" else None
    if simulator == "fast":
        return evaluator.replay(spec, arrival_s, policy=policy)
    sim = (
        SchedulerDrivenDisaggregated(spec, noise=noise, seed=args.seed)
        if policy is None
        else SchedulerDrivenColocated(spec, policy, noise=noise, seed=args.seed)
    )
    w = evaluator.workload
    return sim.run(arrival_s, w.prompt_lens, w.output_lens)


def _run(args) -> int:
    simulator = _simulator(args)
    if simulate_multi_turn.is_multi_turn(args):
        return _run_multi_turn(args, simulator)
    model = planner_args.load_model(args.model)
    cluster = planner_args.build_cluster(args)
    workload, runs = _requests(args)
    max_seq_len = workload.max_seq_len()
    max_batch_tokens = _max_batch_tokens(args, simulator, max_seq_len)
    if simulator == "scheduler" and _is_cb(args) and max_batch_tokens < max_seq_len:
        raise ValueError(
            f"--max-batch-tokens {max_batch_tokens} is below the longest request "
            f"({max_seq_len} tokens): continuous_batching never splits a prompt, so the "
            f"runtime refuses it; raise it or use --policy chunked_prefill"
        )
    profile = load_profile(args.profile)
    spec = _spec(args, model, profile, cluster, max_seq_len, max_batch_tokens)
    noise = _step_noise(args, simulator, profile, model)
    evaluator = GoodputEvaluator(
        workload,
        planner_args.build_slo(args),
        args.target,
        cv=args.cv,
        seed=args.seed,
    )
    rows = []
    for rate, arrival_s in runs:
        arrivals = evaluator.arrivals(rate) if arrival_s is None else arrival_s
        result = _simulate(args, simulator, spec, evaluator, arrivals, noise)
        rows.append(
            {
                "rate": rate,
                "arrivals": "trace" if arrival_s is not None else _process(args.cv),
                **result.summary(evaluator.slo).to_dict(),
                "mean_breakdown_s": result.mean_breakdown(),
            }
        )
    out = {
        "model": model.name,
        "placement": args.placement,
        "simulator": simulator,
        "max_batch_tokens": max_batch_tokens,
        "step_noise": noise is not None,
        "num_devices": spec.num_devices,
        "slo": {"ttft_s": evaluator.slo.ttft_s, "tpot_s": evaluator.slo.tpot_s},
        "runs": rows,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    slo = evaluator.slo
    # One header line (tests and scripts read the table by line): what ran, and on what.
    spread = "measured (drawn per step)" if noise is not None else "none"
    print(
        f"{model.name} {args.placement} on {spec.num_devices} devices; simulator: "
        f"{_SIMULATOR_TEXT[simulator]}; token budget {max_batch_tokens}; step-time "
        f"spread: {spread}"
    )
    # Milliseconds, like the SLO flags and `drt-run bench`'s tables.
    print(f"SLOs: TTFT {slo.ttft_s * 1e3:g} ms, TPOT {slo.tpot_s * 1e3:g} ms; latencies in ms")
    print(f"{'req/s':>8} {'attain':>7} {'ttft p90':>9} {'tpot p90':>9}")
    for r in rows:
        print(
            f"{_rate_text(r['rate'])} {r['attainment']['joint']:7.1%} "
            f"{r['ttft_s']['p90'] * 1e3:9.1f} {r['tpot_s']['p90'] * 1e3:9.2f}"
        )
    return 0


def _run_multi_turn(args, simulator: str) -> int:
    """`simulate_multi_turn`: each rate's conversations on the scheduler-driven simulator."""
    simulate_multi_turn.check_args(args, simulator)
    model = planner_args.load_model(args.model)
    rates = args.rates or [1.0]
    # One workload per rate (same seed: same lengths and ids, starts scaled by the rate).
    workloads = [simulate_multi_turn.build_workload(args, r, model) for r in rates]
    max_seq_len = max(w.max_seq_len() for w in workloads)
    max_batch_tokens = _max_batch_tokens(args, simulator, max_seq_len)
    profile = load_profile(args.profile)
    cluster = planner_args.build_cluster(args)
    spec = _spec(args, model, profile, cluster, max_seq_len, max_batch_tokens)
    noise = _step_noise(args, simulator, profile, model)
    slo = planner_args.build_slo(args)
    caching = not args.no_prefix_caching
    dc = simulate_multi_turn.disagg_config(args)
    rows = []
    for rate, workload in zip(rates, workloads, strict=True):
        if args.placement == "colocated":
            sim = SchedulerDrivenColocated(spec, args.policy, noise=noise, seed=args.seed)
            got = sim.run_conversations(workload, prefix_caching=caching)
        else:
            sim = SchedulerDrivenDisaggregated(spec, noise=noise, seed=args.seed)
            got = sim.run_conversations(workload, prefix_caching=caching, disagg_config=dc)
        rows.append(simulate_multi_turn.row(rate, got, slo))
    out = {
        "json": args.json,
        "model": model.name,
        "placement": args.placement,
        "simulator": simulator,
        "dataset": workloads[0].name,
        "prefix_caching": caching,
        "max_batch_tokens": max_batch_tokens,
        "step_noise": noise is not None,
        "num_devices": spec.num_devices,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "runs": rows,
    }
    if args.placement == "disaggregated":
        out["disagg"] = simulate_multi_turn.disagg_settings(dc)
    header = (
        f"{model.name} {args.placement} on {spec.num_devices} devices; {workloads[0].name}, "
        f"closed loop; simulator: {_SIMULATOR_TEXT[simulator]}; token budget "
        f"{max_batch_tokens}"
    )
    if args.placement == "disaggregated":
        routing = simulate_multi_turn.routing_text(dc)
        header += f"; routing: {routing or 'serve defaults'}"
    simulate_multi_turn.print_table(out, rows, header)
    return 0

"""Simulator vs runtime on this machine: profile the tiny model, simulate each target (the
two colocated policies and disaggregated 1P1D) with that profile, replay the same requests
on the real engine (`LLMEngine`, or the `Controller` with one prefill and one decode
process), repeat, compare.

    PYTHONPATH=. .venv/bin/python bench/sim_vs_runtime.py --threads 2
    PYTHONPATH=. .venv/bin/python bench/sim_vs_runtime.py --quick --output /tmp/svr.json

Writes ``bench/results/sim_vs_runtime_cpu.json`` (the environment and the command, load
average around every run, the drift ratios, the profiles used) and a PNG next to it (SLO
attainment vs rate per target: the runtime's mean over the repeats with its min-max range,
the simulator as profiled and drift-rescaled).

Simulator (``--simulator``): by default the scheduler-driven simulators (the engine's own
schedulers on a simulated clock, each step's time drawn from the profile's measured
step-time noise of its own kind, a different noise seed per repeat); ``fast`` keeps the
fast simulators (deterministic) for comparison. Each simulated instance replays the
measured noise sequence of its step kind in blocks (`step_noise.ReplayedDraws`), so slow
stretches and isolated spikes come as they were measured. A step that starts after the
instance idled also pays the wake-up cost measured after each profile (`wake.measure_wake`:
the engine's thread pool sleeps while idle; ``--no-wake`` leaves it out).

1P1D (driven): calibrated on its running instances (`profile_instances`, unless
``--no-instance-profile``); the time between its processes that no step shows is measured
and simulated (`ProcessHops`): the controller's hop to the prefill instance
(`measure_hops`, on the idle runtime) and each instance's loop between two busy steps
(messages, pulls, outputs sent; from the instance profile's step start times).

Calibration (``--calibration``): by default the latency model is fitted from the steps of an
`LLMEngine` running a synthetic workload in this process (`engine_profile.EngineWorkload`:
per-step host overhead, prefill, decode, and chunked prefill's mixed steps, and the noise
around them); ``isolated`` times isolated steps on a grid (no overhead, no noise).

Colocated (driven): the engine's loop between two busy steps (building outputs, adding the
requests that arrived; 0.08-0.10 ms a step, which no step record holds) is measured from the
calibration's step log and added to every simulated step (`ColocatedSetup.loop_s`). Without
it the simulated engine ran 2-4% more decode steps with smaller batches than the runtime's.

Threads: a colocated engine runs ``--threads``; each disaggregated instance is pinned to
one core and runs one thread, so the two share a 2-core machine without oversubscribing it.
Each thread count gets its own profile, measured as its target runs (one thread pinned to
the prefill instance's core for 1P1D); ``--profile`` files are matched by the threads they
were measured with, the missing ones are profiled here.

Drift: before every run, a fixed probe (one prefill, one decode batch; median of
``--probe-repeats``) is timed and divided by the same probe timed right after profiling.
Each run is simulated twice: with the profile as measured, and with its step times scaled
by that ratio (a gap left after rescaling is the model's, not the machine's). Every run is
also simulated at the speed its own steps had (its step log's measured/predicted ratio per
step kind against the calibration at the rate, else the profile; ``simulated_in_run``): not
a prediction, a split of the gap into the step times' level (fit or machine) and the rest
(the simulator's). ``runtime_mean_se_pp`` is the standard error of the runtime's mean over
the repeats: how far the runtime itself would move on another three.

Calibrated at the rate (``--at-load-requests``, default half of ``--num-requests``): before
each rate's repeats, held-out requests (the next seed's lengths, arrivals and prompts) are
served at that rate with the step log on, and the latency model refitted on those steps
(`calibration.calibrate_at_load`); every repeat is also simulated with it
(``simulated_at_load``, ``gap_at_load_pp``). A closed-loop profile has other batch shapes,
idle gaps and load on the other core than a served rate has (1P1D's steps ran 0.85-1.26x
its instance profile, depending on the rate). It is a prediction: its steps are other
requests' than the compared runs'. A step kind served too rarely to fit its form (chunked
prefill at a rate runs almost no prefill-only steps) keeps the profile's form, scaled to
the steps it had (the profile's ``measurement.borrowed``).

SLOs and rates adapt to the machine, so that attainment spans ~30-100%: the SLOs are
multiples of the profile's unloaded step times (``--ttft-scale``, ``--tpot-scale``), and
each target's rates are multiples (``--load-factors``) of the rate at which its *simulated*
attainment is 90%. ``--slo-ttft-ms``/``--slo-tpot-ms``/``--rates`` fix them instead.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distserve_rt.benchmarks.environment import hardware_name, save_result
from distserve_rt.benchmarks.sim_vs_runtime import (
    ColocatedSetup,
    DisaggSetup,
    DriftProbe,
    Target,
    default_simulator,
    summarize_repeats,
)
from distserve_rt.benchmarks.sim_vs_runtime.calibration import (
    Calibration,
    calibrate,
    calibrate_at_load,
    engine_loop_from_profile,
    kv_transfer_from_bench,
    load_profiles,
    measure_hops,
    measure_kv_transfer,
    profile_engine,
    profile_instances,
    profile_threads,
    set_threads,
    wake_from_profile,
)
from distserve_rt.benchmarks.sim_vs_runtime.plot import plot_attainment
from distserve_rt.benchmarks.sim_vs_runtime.runs import RunSpec, one_run, warm_up
from distserve_rt.benchmarks.sim_vs_runtime.targets import SIMULATORS
from distserve_rt.metrics.slo import SLO, attainment
from distserve_rt.models import load_model
from distserve_rt.planner.goodput import search_rate
from distserve_rt.planner.profiler import ProfileGrid, fit_profile, measure
from distserve_rt.planner.simulator import ColocatedPolicy, KVTransferSpec
from distserve_rt.planner.step_timer import STEP_INCLUDES, RunnerStepTimer
from distserve_rt.workloads import LengthDist, Workload, unit_interarrivals

MODEL = "dummy:llama-tiny"
RESULTS = Path(__file__).parent / "results"
DISAGG = "disaggregated_1p1d"
TARGETS = [*(p.value for p in ColocatedPolicy), DISAGG]

# Imported after distserve_rt, which sets OMP_WAIT_POLICY=PASSIVE before libgomp loads.
import torch  # noqa: E402

QUICK = {"num_requests": 60, "repeats": 1, "load_factors": [0.5, 1.5], "profile_repeats": 1,
         "profile_steps": 150, "probe_repeats": 5}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="colocated engine threads (default 2)")
    p.add_argument("--num-requests", type=int, default=1000, help="requests per run (1000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per (target, rate) (default 3)")
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    p.add_argument("--prompt-lens", default="16,192", help="uniform prompt range LOW,HIGH")
    p.add_argument("--output-lens", default="8,48", help="uniform output range LOW,HIGH")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="step token budget")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running requests at most")
    # Three rates per target keep the full run (3 targets x 3 repeats x 1000 requests)
    # near half an hour on 2 cores; each is a multiple of the simulated 90% rate.
    p.add_argument("--load-factors", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--rates", type=float, nargs="+", help="req/s (overrides --load-factors)")
    p.add_argument("--ttft-scale", type=float, default=4.0, help="TTFT SLO / unloaded prefill")
    p.add_argument("--tpot-scale", type=float, default=2.0, help="TPOT SLO / unloaded decode")
    # Milliseconds and these names, like drt-run bench/plan/simulate.
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO, ms (overrides --ttft-scale)")
    p.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO, ms (overrides --tpot-scale)")
    p.add_argument(
        "--profile",
        nargs="+",
        default=[],
        help="profile JSONs, or an earlier result of this script (its profiles); matched to "
        "the targets by the threads they were measured with, the rest profiled here",
    )
    p.add_argument("--save-profiles", help="folder to write the profiles measured here to")
    p.add_argument(
        "--simulator",
        choices=sorted(SIMULATORS),
        default="driven",
        help="driven: the engine's schedulers on a simulated clock, with step-time noise "
        "(default); fast: the fast simulators, deterministic",
    )
    p.add_argument(
        "--calibration",
        choices=["engine", "isolated"],
        default="engine",
        help="engine: fit the steps of a running LLMEngine (default); isolated: time "
        "isolated steps on a grid",
    )
    p.add_argument(
        "--no-instance-profile",
        dest="instance_profile",
        action="store_false",
        help="1P1D: simulate with the one-thread engine profile measured in this process "
        "instead of one fitted from its running instances' own steps (the default)",
    )
    p.add_argument(
        "--no-wake",
        action="store_true",
        help="driven: leave out the measured cost of a step after the engine idled",
    )
    p.add_argument(
        "--profile-steps", type=int, default=400, help="engine profile: workload steps (400)"
    )
    p.add_argument(
        "--profile-repeats",
        type=int,
        default=3,
        help="engine profile: workload repeats; isolated: repeats per point (default 3)",
    )
    p.add_argument("--probe-repeats", type=int, default=20, help="drift probe repeats (median)")
    p.add_argument(
        "--at-load-requests",
        type=int,
        help="requests of the calibration at each rate (held-out lengths, arrivals and "
        "prompts served at that rate before its repeats; each repeat is also simulated with "
        "the model fitted on those steps); default: half of --num-requests; 0: none",
    )
    p.add_argument(
        "--transfer-results",
        default=str(RESULTS / "transfer_cpu.json"),
        help="transfer_suite.py results: the 1P1D simulator's KV transfer cost",
    )
    p.add_argument(
        "--kv-transfer",
        choices=["measured", "bench"],
        default="measured",
        help="1P1D KV transfer cost: timed on the idle runtime before its runs (default), "
        "or the shm bare pull of --transfer-results",
    )
    p.add_argument("--seed", type=int, default=0, help="lengths, arrivals and prompt tokens")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--output", default=str(RESULTS / "sim_vs_runtime_cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        # Only what the user left at its default.
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.at_load_requests is None:
        args.at_load_requests = args.num_requests // 2
    if args.at_load_requests < 0:
        p.error(f"--at-load-requests must be >= 0, got {args.at_load_requests}")
    keys = ("threads", "num_requests", "repeats", "profile_repeats", "profile_steps")
    for key in (*keys, "probe_repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def _range(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def profile_here(args, model, config, max_model_len: int):
    """Profile the grid the workload needs (the steps both sides will run)."""
    grid = ProfileGrid(args.max_num_seqs, args.max_num_batched_tokens, max_model_len)
    timer = RunnerStepTimer(
        model,
        num_blocks=grid.max_kv_tokens // 16 + grid.max_batch_size + 1,
        block_size=16,
        max_num_batched_tokens=max(grid.max_tokens, grid.max_batch_size),
        max_num_seqs=grid.max_batch_size,
        repeats=args.profile_repeats,
    )
    desc = f"profile ({torch.get_num_threads()} threads)"
    samples = measure(grid, timer, lambda pts: tqdm(pts, desc=desc, unit="step"))
    measurement = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "includes": list(STEP_INCLUDES),
        "grid": grid.to_dict(),
        "samples": samples.to_dict(),
    }
    return fit_profile(samples, config, hardware=hardware_name("cpu"), measurement=measurement)


def engine_profile_here(args, model, bytes_per_token: int, threads: int, max_model_len: int):
    """The engine-step profile of ``threads`` threads: a chunked-prefill `LLMEngine` (its
    steps are prefill-only, decode-only and mixed, so every kind the targets run is fitted)
    with the targets' limits, running prompts and outputs up to the workload's longest."""
    setup = ColocatedSetup(
        ColocatedPolicy.CHUNKED_PREFILL,
        args.max_num_batched_tokens,
        args.max_num_seqs,
        max_model_len,
        args.max_num_seqs * max_model_len,
    )
    engine = setup.make_engine(bytes_per_token, model=model)
    try:
        desc = f"engine profile ({threads} threads)"
        return profile_engine(
            engine,
            _profile_workload(args),
            threads,
            repeats=args.profile_repeats,
            hardware=hardware_name("cpu"),
            progress=lambda steps: tqdm(steps, desc=desc, unit="step"),
        )
    finally:
        engine.shutdown()


def _profile_workload(args):
    """The served workload's own lengths: the fit sees the contexts the runs' steps have."""
    from distserve_rt.benchmarks.engine_profile import EngineWorkload

    (p_lo, p_hi), (o_lo, o_hi) = _range(args.prompt_lens), _range(args.output_lens)
    return EngineWorkload(
        args.profile_steps,
        p_hi,
        o_hi,
        2 * args.max_num_seqs,
        args.seed,
        lengths="uniform",
        min_prompt_len=p_lo,
        min_output_len=max(o_lo, 2),
    )


def instance_calibration(args, engine, cal: Calibration) -> Calibration:
    """1P1D calibrated on its own running instances (`profile_instances`): their steps'
    fit, noise and wake-up cost replace the one-thread engine's; the drift-probe reference
    stays (the probe times isolated steps in this process)."""
    _, config = load_model(MODEL)
    desc = "1P1D instances profile"
    profile = profile_instances(
        engine,
        _profile_workload(args),
        repeats=args.profile_repeats,
        hardware=hardware_name("cpu"),
        progress=lambda steps: tqdm(steps, desc=desc, unit="step"),
    )
    driven = args.simulator == "driven"
    noise = profile.step_noise_by_kind(config, 1) if driven else None
    wake = wake_from_profile(profile) if driven and not args.no_wake else None
    return replace(
        cal, profile=profile, latency=profile.latency_model(config, 1), noise=noise,
        wake=wake, reference_source=f"{cal.reference_source} (one-thread engine profile)",
        engine_loop_s=0.0,  # its instances' loops are in the hops
    )  # fmt: skip


def calibrations(args, model, config, thread_counts, probe, probe_timer, max_model_len, bpt):
    """A `Calibration` per thread count: from ``--profile`` files, else profiled here."""
    files = {}
    for path in args.profile:
        for profile in load_profiles(path):
            files[profile_threads(profile, path)] = profile
    out = {}
    for threads in sorted(thread_counts):
        set_threads(threads)
        profile = files.get(threads)
        measured_here = profile is None
        if measured_here and args.calibration == "engine":
            profile = engine_profile_here(args, model, bpt, threads, max_model_len)
        elif measured_here:
            profile = profile_here(args, model, config, max_model_len)
        if measured_here and args.save_profiles:
            profile.save(Path(args.save_profiles) / f"tiny_cpu_{threads}t.json")
        latency = profile.latency_model(config, 1)
        timer = probe_timer if measured_here else None
        cal = calibrate(profile, latency, threads, probe, timer)
        # An isolated profile has no noise: its simulation stays deterministic.
        driven = args.simulator == "driven"
        noise = profile.step_noise_by_kind(config, 1) if driven else None
        wake = wake_from_profile(profile) if driven and not args.no_wake else None
        loop = engine_loop_from_profile(profile) if driven else 0.0  # the fast one has none
        out[threads] = replace(cal, noise=noise, wake=wake, engine_loop_s=loop)
    return out


def choose_slo(args, latency, workload: Workload) -> SLO:
    prompt = float(workload.prompt_lens.mean())
    ctx = prompt + float(workload.output_lens.mean()) / 2
    ttft = args.ttft_scale * latency.prefill_s(int(prompt), int(prompt**2))
    tpot = args.tpot_scale * latency.decode_s(1, int(ctx + 1))
    ttft = ttft if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3
    tpot = tpot if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3
    return SLO(ttft, tpot)


def choose_rates(args, target: Target, latency, gaps, workload, slo) -> list[float]:
    if args.rates:
        return sorted(args.rates)

    def sim_attainment(rate: float) -> float:
        run = target.simulate(target.setup, latency, gaps / rate, workload)
        return attainment(run.ttft, run.tpot, slo).joint

    r90, _ = search_rate(sim_attainment, 0.9, rate_hint=1.0, rel_tol=0.05)
    if r90 <= 0:
        raise NoRateError(
            f"{target.name}: no rate meets 90% of {slo} in simulation; loosen the SLO scales"
        )
    return [round(f * r90, 3) for f in args.load_factors]


def make_targets(args, max_model_len: int, kv_transfer: KVTransferSpec) -> list[Target]:
    kv_tokens = args.max_num_seqs * max_model_len  # no memory pressure on either side
    # A whole prompt must fit one step of continuous batching and one prefill batch (L_m).
    whole = max(args.max_num_batched_tokens, max_model_len)
    setups = {
        "continuous_batching": ColocatedSetup(
            ColocatedPolicy.CONTINUOUS_BATCHING, whole, args.max_num_seqs, max_model_len, kv_tokens
        ),
        "chunked_prefill": ColocatedSetup(
            ColocatedPolicy.CHUNKED_PREFILL,
            args.max_num_batched_tokens,
            args.max_num_seqs,
            max_model_len,
            kv_tokens,
        ),
        DISAGG: DisaggSetup(whole, args.max_num_seqs, max_model_len, kv_tokens, kv_transfer),
    }
    return [
        Target(name, setups[name], default_simulator(setups[name], args.simulator))
        for name in args.targets
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    max_model_len = _range(args.prompt_lens)[1] + _range(args.output_lens)[1]
    workload = Workload.synthetic(args.num_requests, *_length_dists(args), seed=args.seed)
    gaps = np.cumsum(unit_interarrivals(args.num_requests, seed=args.seed))
    model, config = load_model(MODEL)
    bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    kv_transfer = kv_transfer_from_bench(args.transfer_results, bytes_per_token)
    targets = make_targets(args, max_model_len, kv_transfer)
    # Mid-workload shapes, so the probe's ratio is that of the steps the runs take.
    mean_prompt = int(workload.prompt_lens.mean())
    probe = DriftProbe(
        mean_prompt,
        max(1, args.max_num_seqs // 4),
        mean_prompt + int(workload.output_lens.mean()) // 2,
    )
    probe_timer = RunnerStepTimer(
        model,
        num_blocks=probe.decode_batch * (probe.decode_ctx // 16 + 2) + probe.prefill_len // 16 + 2,
        block_size=16,
        max_num_batched_tokens=max(probe.prefill_len, probe.decode_batch),
        max_num_seqs=probe.decode_batch,
        repeats=args.probe_repeats,
    )
    threads_of = {t.name: t.threads or args.threads for t in targets}
    cals = calibrations(
        args,
        model,
        config,
        set(threads_of.values()),
        probe,
        probe_timer,
        max_model_len,
        bytes_per_token,
    )
    # One SLO for every target, from the slowest profile's unloaded steps (one-thread
    # instances are slower): each target then reaches 90% attainment at some rate.
    slo = loosest([choose_slo(args, c.latency, workload) for c in cals.values()])
    print(f"SLO ttft {slo.ttft_s * 1e3:.1f} ms, tpot {slo.tpot_s * 1e3:.2f} ms", flush=True)
    ctx = Context(args, model, bytes_per_token, workload, gaps, slo, probe, probe_timer)
    repeats, summaries, skipped = [], [], {}
    for i, target in enumerate(targets):
        try:
            targets[i], rows = _run_target(ctx, target, cals[threads_of[target.name]])
        except NoRateError as exc:  # the other targets' results still count
            print(f"skipped: {exc}", flush=True)
            skipped[target.name] = str(exc)
            continue
        repeats += rows
        for rate in dict.fromkeys(r["rate"] for r in rows):
            same = [r for r in rows if r["rate"] == rate]
            summaries.append({"target": target.name, "rate": rate, **summarize_repeats(same)})
        # Saved after every target: a long run stopped later keeps what it measured.
        _save(args, workload, slo, targets, cals, ctx, probe, repeats, summaries, skipped)
    return 0 if summaries and not skipped else 1


class NoRateError(ValueError):
    """No rate meets 90% attainment of the SLO in the target's simulation."""


def loosest(slos: list[SLO]) -> SLO:
    return SLO(max(s.ttft_s for s in slos), max(s.tpot_s for s in slos))


@dataclass(frozen=True)
class Context:
    """What every run of the harness shares."""

    args: argparse.Namespace
    model: object
    bytes_per_token: int
    workload: Workload
    gaps: np.ndarray
    """Unit-rate arrival times ``[num_requests]`` (s at 1 req/s)."""
    slo: SLO
    probe: DriftProbe
    probe_timer: RunnerStepTimer
    instance_cals: dict[str, Calibration] = field(default_factory=dict)
    """1P1D's calibration from its running instances (`--no-instance-profile`: none)."""
    at_load_cals: dict[str, Calibration] = field(default_factory=dict)
    """``target@rate`` -> its calibration at that rate (`--at-load-requests`)."""
    at_load_skipped: dict[str, str] = field(default_factory=dict)
    """``target@rate`` -> why its steps at that rate could not be fitted (that rate's
    repeats then have no ``simulated_at_load`` row)."""


def _run_target(ctx: Context, target: Target, cal: Calibration) -> tuple[Target, list[dict]]:
    """Every rate and repeat of ``target`` on one engine; the target returned carries what
    was measured on it (1P1D: the KV transfer cost)."""
    args = ctx.args
    set_threads(args.threads)
    engine = target.setup.make_engine(ctx.bytes_per_token, model=ctx.model)
    try:
        warm_up(engine)
        if isinstance(target.setup, DisaggSetup) and args.kv_transfer == "measured":
            kv = measure_kv_transfer(engine, int(ctx.workload.prompt_lens.mean()))
            target = replace(target, setup=replace(target.setup, kv_transfer=kv))
        if isinstance(target.setup, DisaggSetup) and args.instance_profile:
            cal = instance_calibration(args, engine, cal)
            ctx.instance_cals[target.name] = cal
            if args.simulator == "driven":  # the fast simulator has no hops
                hops = measure_hops(engine, target, cal, ctx.workload)
                target = replace(target, setup=replace(target.setup, hops=hops))
                print(f"{target.name}: hops {hops}", flush=True)
        rates = choose_rates(args, target, cal.latency, ctx.gaps, ctx.workload, ctx.slo)
        print(f"{target.name}: rates {rates} (threads per instance {cal.threads})", flush=True)
        rows = []
        for rate in rates:
            arrival = ctx.gaps / rate
            at_load = _calibrate_at_load(ctx, engine, target, cal, rate)
            run = RunSpec(
                target, cal, rate, arrival, ctx.workload, ctx.slo, args.threads, args.seed,
                at_load=at_load,
            )  # fmt: skip
            # Each repeat draws its own step-time noise, as each served run has its own.
            rows += [
                {"target": target.name, "rate": rate, "repeat": r,
                 **one_run(replace(run, noise_seed=args.seed * 1000 + r), engine, ctx.probe,
                           ctx.probe_timer)}
                for r in range(args.repeats)
            ]  # fmt: skip
            print(_line({"target": target.name, "rate": rate,
                         **summarize_repeats(rows[-args.repeats:])}), flush=True)  # fmt: skip
        return target, rows
    finally:
        engine.shutdown()


def _calibrate_at_load(ctx: Context, engine, target: Target, cal: Calibration, rate: float):
    """``cal`` refitted on the engine's steps serving held-out requests (the next seed's
    lengths, arrivals and prompts) at ``rate``; None with ``--at-load-requests 0``."""
    args = ctx.args
    n = args.at_load_requests
    if n == 0:
        return None
    seed = args.seed + 1  # never the compared runs' requests
    held_out = Workload.synthetic(n, *_length_dists(args), seed=seed)
    arrival = np.cumsum(unit_interarrivals(n, seed=seed)) / rate
    desc = f"{target.name} calibration @ {rate:g} req/s"
    key = f"{target.name}@{rate:g}"
    with tqdm(total=n, desc=desc, unit="req", leave=False) as bar:
        try:
            at_load = calibrate_at_load(
                engine, cal, arrival, held_out, rate=rate, seed=seed,
                hardware=hardware_name("cpu"),
                progress=bar.update,
            )  # fmt: skip
        except ValueError as exc:  # too few decode steps to fit, even with the fallback
            print(f"{key}: no calibration at the rate: {exc}", flush=True)
            ctx.at_load_skipped[key] = str(exc)
            return None
    ctx.at_load_cals[key] = at_load
    return at_load


def _length_dists(args) -> tuple[LengthDist, LengthDist]:
    (p_lo, p_hi), (o_lo, o_hi) = _range(args.prompt_lens), _range(args.output_lens)
    return LengthDist("uniform", low=p_lo, high=p_hi), LengthDist("uniform", low=o_lo, high=o_hi)


def _line(s) -> str:
    rt, sim = s["runtime_attainment"], s["simulated_attainment"]
    return (
        f"{s['target']:<20} rate {s['rate']:7.3f}  runtime {rt['mean']:6.1%} "
        f"[{rt['min']:.1%}, {rt['max']:.1%}]  sim {sim['mean']:6.1%} "
        f"(gap {s['gap_pp']:+5.1f} pp)  rescaled "
        f"{s['simulated_rescaled_attainment']['mean']:6.1%} (gap {s['gap_rescaled_pp']:+5.1f} pp)"
        f"  drift p {s['drift_prefill']['mean']:.2f} d {s['drift_decode']['mean']:.2f}"
        + (f"  in-run gap {s['gap_in_run_pp']:+5.1f} pp" if "gap_in_run_pp" in s else "")
        + (f"  at-load gap {s['gap_at_load_pp']:+5.1f} pp" if "gap_at_load_pp" in s else "")
        + f"  runtime mean's s.e. {s['runtime_mean_se_pp']:.1f} pp"
    )


def _save(
    args, workload, slo, targets, cals, ctx: Context, probe, repeats, summaries, skipped
) -> None:
    payload = {
        "benchmark": "sim_vs_runtime",
        "model": MODEL,
        "workload": {
            **workload.describe(),
            "prompt_lens": args.prompt_lens,
            "output_lens": args.output_lens,
            "arrivals": "poisson",
            "seed": args.seed,
            "same_requests_every_repeat": True,
        },
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "threads": {"colocated": args.threads, DISAGG: 1},
        "simulator": args.simulator,
        "calibration": args.calibration,
        "command": " ".join(sys.argv),
        "targets": {t.name: t.setup.describe() for t in targets},
        "profiles": {str(k): c.describe() for k, c in cals.items()},
        "instance_profiles": {k: c.describe() for k, c in ctx.instance_cals.items()},
        "drift_probe": {**probe.to_dict(), "repeats": args.probe_repeats},
        "max_abs_gap_pp": max(abs(s["gap_pp"]) for s in summaries),
        "max_abs_gap_rescaled_pp": max(abs(s["gap_rescaled_pp"]) for s in summaries),
        "max_abs_gap_in_run_pp": max(
            (abs(s["gap_in_run_pp"]) for s in summaries if "gap_in_run_pp" in s), default=None
        ),
        "max_abs_gap_at_load_pp": max(
            (abs(s["gap_at_load_pp"]) for s in summaries if "gap_at_load_pp" in s), default=None
        ),
        "at_load_requests": args.at_load_requests,
        "at_load_profiles": {k: c.describe(sequences=False) for k, c in ctx.at_load_cals.items()},
        "at_load_skipped": ctx.at_load_skipped,
        "skipped_targets": skipped,
        "summaries": summaries,
        "repeats": repeats,
    }
    path = save_result(args.output, payload)
    setup = (
        f"{args.num_requests} req/run x {args.repeats} repeats, prompts {args.prompt_lens}, "
        f"outputs {args.output_lens}, colocated {args.threads} threads, 1P1D 1 core each"
    )
    title = (
        f"{MODEL} on CPU: simulator vs runtime (SLO ttft {slo.ttft_s * 1e3:.0f} ms, "
        f"tpot {slo.tpot_s * 1e3:.1f} ms)\n{setup}"
    )
    png = plot_attainment(summaries, title, path.with_suffix(".png"))
    print(f"saved {path} and {png}")


if __name__ == "__main__":
    sys.exit(main())

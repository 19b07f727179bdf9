"""Simulator vs runtime on this machine: profile the tiny model, simulate the colocated
policies with that profile, replay the same requests on the real `LLMEngine`, compare.

    PYTHONPATH=. .venv/bin/python bench/sim_vs_runtime.py --threads 2

Writes ``bench/results/sim_vs_runtime_cpu.json`` (with the environment and the command) and
a PNG next to it (SLO attainment vs rate: simulated and measured, per policy).

SLOs and rates adapt to the machine, so that attainment spans ~30-100%: the SLOs are
multiples of the profile's unloaded step times (``--ttft-scale``, ``--tpot-scale``), and the
rates are multiples (``--load-factors``) of the rate at which the *simulated* continuous
batching policy meets 90% attainment. ``--slo-ttft-ms``/``--slo-tpot-ms``/``--rates`` fix them
instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distserve_rt import _native
from distserve_rt.benchmarks.environment import hardware_name, save_result
from distserve_rt.benchmarks.sim_vs_runtime import (
    ColocatedSetup,
    replay,
    simulate_colocated,
)
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.metrics.slo import SLO, attainment
from distserve_rt.models import load_model
from distserve_rt.planner.goodput import search_rate
from distserve_rt.planner.latency_model import FittedLatencyModel
from distserve_rt.planner.profiler import ProfileGrid, fit_profile, measure
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import ColocatedPolicy
from distserve_rt.planner.step_timer import STEP_INCLUDES, RunnerStepTimer
from distserve_rt.workloads import LengthDist, Workload, unit_interarrivals

MODEL = "dummy:llama-tiny"
RESULTS = Path(__file__).parent / "results"

# Imported after distserve_rt, which sets OMP_WAIT_POLICY=PASSIVE before libgomp loads.
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--num-requests", type=int, default=200, help="requests per rate (default: 200)")
    p.add_argument("--prompt-lens", default="16,192", help="uniform prompt range LOW,HIGH")
    p.add_argument("--output-lens", default="8,48", help="uniform output range LOW,HIGH")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="step token budget")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running requests at most")
    p.add_argument("--policies", nargs="+", default=[p.value for p in ColocatedPolicy])
    p.add_argument("--load-factors", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--rates", type=float, nargs="+", help="req/s (overrides --load-factors)")
    p.add_argument("--ttft-scale", type=float, default=4.0, help="TTFT SLO / unloaded prefill")
    p.add_argument("--tpot-scale", type=float, default=2.0, help="TPOT SLO / unloaded decode")
    # Milliseconds and these names, like drt-run bench/plan/simulate.
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO, ms (overrides --ttft-scale)")
    p.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO, ms (overrides --tpot-scale)")
    p.add_argument("--profile", help="reuse this profile JSON instead of profiling now")
    p.add_argument("--repeats", type=int, default=5, help="profiler repeats per grid point")
    p.add_argument("--seed", type=int, default=0, help="lengths, arrivals and prompt tokens")
    p.add_argument("--output", default=str(RESULTS / "sim_vs_runtime_cpu.json"))
    return p.parse_args(argv)


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
        repeats=args.repeats,
    )
    samples = measure(grid, timer, lambda pts: tqdm(pts, desc="profile", unit="step"))
    measurement = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "includes": list(STEP_INCLUDES),
        "grid": grid.to_dict(),
        "samples": samples.to_dict(),
    }
    return fit_profile(samples, config, hardware=hardware_name("cpu"), measurement=measurement)


def choose_slo(args, latency, workload: Workload) -> SLO:
    prompt = float(workload.prompt_lens.mean())
    ctx = prompt + float(workload.output_lens.mean()) / 2
    ttft = args.ttft_scale * latency.prefill_s(int(prompt), int(prompt**2))
    tpot = args.tpot_scale * latency.decode_s(1, int(ctx + 1))
    ttft = ttft if args.slo_ttft_ms is None else args.slo_ttft_ms / 1e3
    tpot = tpot if args.slo_tpot_ms is None else args.slo_tpot_ms / 1e3
    return SLO(ttft, tpot)


def choose_rates(args, setup, latency, gaps, workload, slo) -> list[float]:
    if args.rates:
        return sorted(args.rates)

    def sim_attainment(rate: float) -> float:
        run = simulate_colocated(setup, latency, gaps / rate, workload)
        return attainment(run.ttft, run.tpot, slo).joint

    r90, _ = search_rate(sim_attainment, 0.9, rate_hint=1.0, rel_tol=0.05)
    if r90 <= 0:
        raise ValueError(f"no rate meets 90% of {slo} in simulation; loosen the SLO scales")
    return [round(f * r90, 3) for f in args.load_factors]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    _native.set_num_threads(args.threads)
    (p_lo, p_hi), (o_lo, o_hi) = _range(args.prompt_lens), _range(args.output_lens)
    max_model_len = p_hi + o_hi
    workload = Workload.synthetic(
        args.num_requests,
        LengthDist("uniform", low=p_lo, high=p_hi),
        LengthDist("uniform", low=o_lo, high=o_hi),
        seed=args.seed,
    )
    gaps = np.cumsum(unit_interarrivals(args.num_requests, seed=args.seed))
    model, config = load_model(MODEL)
    if args.profile:
        profile = load_profile(args.profile)
    else:
        profile = profile_here(args, model, config, max_model_len)
    entry = profile.find(config.name, 1)
    latency = FittedLatencyModel(entry.coefficients)
    kv_tokens = args.max_num_seqs * max_model_len  # no memory pressure on either side
    bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    setups = {
        policy: ColocatedSetup(
            ColocatedPolicy(policy),
            max(args.max_num_batched_tokens, max_model_len)
            if policy == "continuous_batching"
            else args.max_num_batched_tokens,
            args.max_num_seqs,
            max_model_len,
            kv_tokens,
        )
        for policy in args.policies
    }
    slo = choose_slo(args, latency, workload)
    base = setups.get("continuous_batching", next(iter(setups.values())))
    rates = choose_rates(args, base, latency, gaps, workload, slo)
    print(f"SLO ttft {slo.ttft_s * 1e3:.1f} ms, tpot {slo.tpot_s * 1e3:.2f} ms; rates {rates}")
    runs = []
    for policy, setup in setups.items():
        engine = LLMEngine(setup.engine_config(bytes_per_token), model=model)
        _warm_up(engine)
        for rate in rates:
            arrival = gaps / rate
            sim = simulate_colocated(setup, latency, arrival, workload).row(slo)
            real = replay(engine, arrival, workload, seed=args.seed).row(slo)
            runs.append({"policy": policy, "rate": rate, "simulated": sim, "runtime": real})
            print(_line(runs[-1]), flush=True)
        engine.shutdown()
    _save(args, profile, workload, slo, setups, runs)
    return 0


def _warm_up(engine: LLMEngine) -> None:
    """One request through the engine so first-step costs do not land on a measured one."""
    from distserve_rt.sampling_params import SamplingParams

    engine.add_request("warmup", [1] * 32, SamplingParams(temperature=0.0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()


def _line(run) -> str:
    s, r = run["simulated"], run["runtime"]
    return (
        f"{run['policy']:<20} rate {run['rate']:7.3f}  attainment sim {s['attainment']:6.1%} "
        f"runtime {r['attainment']:6.1%} (diff {100 * (r['attainment'] - s['attainment']):+5.1f}"
        f" pp)  mean ttft {s['mean_ttft_s'] * 1e3:7.1f}/{r['mean_ttft_s'] * 1e3:7.1f} ms  "
        f"tpot {s['mean_tpot_s'] * 1e3:6.2f}/{r['mean_tpot_s'] * 1e3:6.2f} ms  "
        f"host {r['mean_host_overhead_ms']:.2f} ms/step"
    )


def _save(args, profile, workload, slo, setups, runs) -> None:
    entry = profile.entries[0]
    payload = {
        "benchmark": "sim_vs_runtime",
        "model": MODEL,
        "workload": {
            **workload.describe(),
            "prompt_lens": args.prompt_lens,
            "output_lens": args.output_lens,
            "arrivals": "poisson",
            "seed": args.seed,
        },
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "setups": {k: {**vars(v), "policy": v.policy.value} for k, v in setups.items()},
        "profile": {
            "coefficients_ms": entry.coefficients.to_dict(),
            "fit_error": {k: v.to_dict() for k, v in entry.fit_error.items()},
            "threads": profile.measurement.get("threads"),
        },
        # Other processes on the cores show up as runtime latency the profile did not see.
        "load_average_1min_at_end": os.getloadavg()[0],
        "max_abs_attainment_diff_pp": max(
            100 * abs(r["runtime"]["attainment"] - r["simulated"]["attainment"]) for r in runs
        ),
        "runs": runs,
    }
    path = save_result(args.output, payload)
    png = _plot(runs, path.with_suffix(".png"))
    print(f"saved {path} and {png}")


def _plot(runs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, policy in enumerate(sorted({r["policy"] for r in runs})):
        rows = sorted((r for r in runs if r["policy"] == policy), key=lambda r: r["rate"])
        rates = [r["rate"] for r in rows]
        color = f"C{i}"
        ax.plot(
            rates,
            [100 * r["simulated"]["attainment"] for r in rows],
            "--o",
            color=color,
            label=f"{policy} (simulated)",
        )
        ax.plot(
            rates,
            [100 * r["runtime"]["attainment"] for r in rows],
            "-s",
            color=color,
            label=f"{policy} (runtime)",
        )
    ax.set_xlabel("rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title("dummy:llama-tiny on CPU: simulator vs runtime", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

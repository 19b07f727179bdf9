"""What `drt-run bench --compare` (the main job, `make run`) tells its reader besides the
tables: what it is about to run, a one-line verdict computed from the results, and a PNG of
SLO attainment and goodput vs rate per setup.

The verdict and the plot read the sweep JSONs (`sweep.sweep_json`): the same numbers the
saved result holds, so a reader can check the sentence against the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from distserve_rt.config import EngineConfig
from distserve_rt.planner.plot import _attainment_axes, _pyplot, _save
from distserve_rt.workloads import Workload


def describe_plan(args: argparse.Namespace, workload: Workload, slo_ms: tuple[float, float]) -> str:
    """The lines printed before anything runs: model, device, setups, rates, SLOs, requests."""
    setups = ", ".join(e.label for e in args.compare) if args.compare else args.base_url
    defaults = EngineConfig()  # what the in-process engine runs for flags left unset
    where = "the server" if args.base_url else getattr(args, "device", None) or defaults.device
    model = getattr(args, "model", None) or ("its model" if args.base_url else defaults.model)
    rates = ", ".join(f"{r:g}" for r in args.request_rate)
    prompt, output = workload.prompt_lens, workload.output_lens
    return "\n".join(
        [
            f"drt-run bench: {model} on {where}",
            f"  setups:   {setups}",
            f"  rates:    {rates} req/s, {workload.num_requests} requests each "
            f"({workload.name}: prompt mean {prompt.mean():.0f} max {prompt.max()} tokens, "
            f"output mean {output.mean():.0f} max {output.max()})",
            f"  SLOs:     TTFT {slo_ms[0]:g} ms, TPOT {slo_ms[1]:g} ms; a setup meets them at "
            f"a rate when >= {args.attainment_target:.0%} of requests meet both",
        ]
    )


def _points(sweep: dict[str, Any]) -> dict[float, tuple[float, float]]:
    """``{rate: (joint attainment, goodput req/s)}`` of a sweep's finite-rate runs."""
    out = {}
    for run in sweep["runs"]:
        rate = float(run["request_rate"])
        if rate != float("inf"):
            out[rate] = (float(run["attainment"]["joint"]), float(run["request_goodput"]))
    return out


def verdict(sweeps: list[dict[str, Any]]) -> str:
    """One line: the setup that meets the SLOs at the highest rate run (ties: the higher
    attainment, then goodput there) and how it compares with the others at that rate (their
    attainment and goodput, its goodput as a multiple of the best of theirs); when none
    meets them at any rate, the setup closest to doing so."""
    target = float(sweeps[0]["slo"]["target"])
    points = {s["label"]: _points(s) for s in sweeps}
    candidates = [(label, rate) for label, p in points.items() for rate in p]
    if not candidates:
        return "no finite rate was run: nothing to compare"
    passing = [lr for lr in candidates if points[lr[0]][lr[1]][0] >= target]
    if passing:
        label, rate = max(passing, key=lambda lr: (lr[1], *points[lr[0]][lr[1]]))
    else:  # the closest: the highest attainment anywhere, at the higher rate on a tie
        label, rate = max(candidates, key=lambda lr: (points[lr[0]][lr[1]][0], lr[1]))
    attainment, goodput = points[label][rate]
    others = {o: p[rate] for o, p in points.items() if o != label and rate in p}
    vs = ", ".join(f"{o} {a:.0%} ({g:.2f} req/s)" for o, (a, g) in others.items())
    if not passing:
        return (
            f"no setup meets the SLOs ({target:.0%} attainment) at any rate run; closest: "
            f"{label} with {attainment:.0%} at {rate:g} req/s" + (f" vs {vs}" if vs else "")
        )
    line = (
        f"{label} meets the SLOs at {rate:g} req/s with {attainment:.0%} attainment "
        f"(target {target:.0%}), goodput {goodput:.2f} req/s"
    )
    if not others:
        return line
    best_other = max(g for _, g in others.values())
    ratio = f"{goodput / best_other:.3g}x the goodput" if best_other > 0 else "no goodput there"
    return f"{line}, vs {vs}: {ratio}"


def plot_compare(sweeps: list[dict[str, Any]], path: str | Path) -> Path:
    """Two panels, one line per setup: SLO attainment vs rate (with the target line) and
    goodput (req/s meeting both SLOs) vs rate; the title names the setups and SLOs."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = {s["label"]: [(r, a) for r, (a, _) in sorted(_points(s).items())] for s in sweeps}
    slo = sweeps[0]["slo"]
    _attainment_axes(left, curves, float(slo["target"]))
    for sweep in sweeps:
        rates = sorted(_points(sweep).items())
        right.plot([r for r, _ in rates], [g for _, (_, g) in rates], marker="o")
    right.set_xlabel("rate (req/s)")
    right.set_ylabel("goodput (req/s meeting both SLOs)")
    right.grid(True, alpha=0.3)
    fig.suptitle(
        f"{' vs '.join(curves)} on {sweeps[0]['model_id']}: SLOs TTFT {slo['ttft_ms']:g} ms, "
        f"TPOT {slo['tpot_ms']:g} ms, target {float(slo['target']):.0%}",
        fontsize=9,
    )
    return _save(fig, plt, path)

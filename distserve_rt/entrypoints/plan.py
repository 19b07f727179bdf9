"""`drt-run plan`: search placements (DistServe Algorithm 1 or 2) for a model, cluster,
workload, SLOs and traffic rate; print a ranked table, write a placement file."""

from __future__ import annotations

import json
import time

import numpy as np

from distserve_rt.entrypoints import planner_args
from distserve_rt.planner.placement import Affinity, PlanInputs, Planner
from distserve_rt.planner.placement_file import PhasePlacement, PlacementFile
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator import ColocatedPolicy


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="search the placement with the best per-device goodput", description=__doc__
    )
    planner_args.add_common(p)
    p.add_argument("--rate", type=float, required=True, help="traffic rate to serve, req/s")
    p.add_argument(
        "--affinity",
        choices=[a.value for a in Affinity],
        default="low",
        help="high: fast cross-node network (Algorithm 1); low: KV must stay in a node "
        "(Algorithm 2) (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-max-batch-tokens",
        type=int,
        default=512,
        help="L_m, the prefill batch token budget (default: %(default)s)",
    )
    p.add_argument(
        "--rel-tol",
        type=float,
        default=0.03,
        help="relative tolerance of the goodput bisection (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        default="placement.yaml",
        help="placement file to write (default: %(default)s); '' to skip",
    )
    p.add_argument("--plot", default="", help="PNG of attainment vs rate for the top configs")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _row(c) -> dict:
    pred = c.predicted or {}
    return {
        "config": c.label(),
        "placement": c.placement,
        "num_devices": c.num_devices,
        "goodput": c.goodput.rate,
        "per_device_goodput": c.per_device,
        "ttft_p90_s": pred.get("ttft_s", {}).get("p90"),
        "tpot_p90_s": pred.get("tpot_s", {}).get("p90"),
    }


def _curves(planner: Planner, result, num: int = 3) -> dict[str, list[tuple[float, float]]]:
    curves = {}
    for c in result.ranked[:num]:
        policy = ColocatedPolicy.CONTINUOUS_BATCHING if c.placement == "colocated" else None
        pts = []
        for rate in np.linspace(0.25, 1.75, 7) * c.goodput.rate:
            res = planner.evaluator.simulate(c.spec, float(rate), policy=policy)
            pts.append((float(rate), planner.evaluator.attainment(res)))
        curves[c.label()] = pts
    return curves


def run(args) -> int:
    start = time.perf_counter()
    inputs = PlanInputs(
        model=planner_args.load_model(args.model),
        cluster=planner_args.build_cluster(args),
        workload=planner_args.build_workload(args),
        slo=planner_args.build_slo(args),
        profile=load_profile(args.profile),
        rate=args.rate,
        affinity=args.affinity,
        target=args.target,
        prefill_max_batch_tokens=args.prefill_max_batch_tokens,
        rel_tol=args.rel_tol,
        seed=args.seed,
        show_progress=not (args.no_progress or args.json),
    )
    planner = Planner(inputs)
    result = planner.run()
    seconds = time.perf_counter() - start
    best = result.best
    prefill = PhasePlacement(best.prefill[0], best.prefill[1], result.num_prefill)
    decode = PhasePlacement(best.decode[0], best.decode[1], result.num_decode)
    fits = prefill.num_devices + decode.num_devices <= inputs.cluster.num_devices
    placement = PlacementFile(
        model=args.model,
        placement="disaggregated",
        prefill=prefill,
        decode=decode,
        # Only a placement that fits is validated against (and written with) the cluster.
        cluster=inputs.cluster.to_dict() if fits else {},
        slo={"ttft_s": inputs.slo.ttft_s, "tpot_s": inputs.slo.tpot_s, "target": inputs.target},
        predicted={"per_device_goodput": best.per_device, **result.predicted},
    )
    out = {
        "search_seconds": seconds,
        "placement": placement.to_dict(),
        "fits_cluster": fits,
        "ranked": [_row(c) for c in result.ranked[: args.top]],
        "rejected": [{"config": c, "reasons": r} for c, r in result.rejected],
    }
    if args.output and fits:
        out["placement_file"] = str(placement.save(args.output))
    if args.plot:
        from distserve_rt.planner.plot import plot_attainment

        out["plot"] = str(plot_attainment(_curves(planner, result), inputs.target, args.plot))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'config':<28} {'devices':>7} {'goodput/dev':>11} {'ttft p90':>9} {'tpot p90':>9}")
    for r in out["ranked"]:
        ttft = "-" if r["ttft_p90_s"] is None else f"{r['ttft_p90_s']:.3f}"
        tpot = "-" if r["tpot_p90_s"] is None else f"{r['tpot_p90_s']:.4f}"
        print(
            f"{r['config']:<28} {r['num_devices']:>7} {r['per_device_goodput']:>11.3f} "
            f"{ttft:>9} {tpot:>9}"
        )
    print(
        f"chosen: {result.num_prefill} x prefill tp{best.prefill[0]}pp{best.prefill[1]} + "
        f"{result.num_decode} x decode tp{best.decode[0]}pp{best.decode[1]} "
        f"({placement.num_devices} devices, search {seconds:.2f} s)"
    )
    if not fits:
        print(
            f"warning: needs {placement.num_devices} devices, the cluster has "
            f"{inputs.cluster.num_devices}; no placement file written"
        )
    elif args.output:
        print(f"placement file: {out['placement_file']}")
    return 0

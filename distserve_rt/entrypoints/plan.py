"""`drt-run plan`: search placements (DistServe Algorithm 1 or 2) for a model, cluster,
workload, SLOs and traffic rate; print a ranked table, write a placement file.

When no placement that fits the cluster meets the target at the rate, the file written is
the best the cluster can run, marked "best effort" with the rate it sustains, and the
text says what would meet the target."""

from __future__ import annotations

import json
import time

import numpy as np

from distserve_rt.config import PlacementKind
from distserve_rt.entrypoints import planner_args, simulate_multi_turn
from distserve_rt.entrypoints.engine_args import positive_float, positive_int
from distserve_rt.planner.candidates import Candidate, num_nodes_needed, parallelism_label
from distserve_rt.planner.cluster import build_instance
from distserve_rt.planner.placement import Affinity, PlanInputs, Planner, PlanResult
from distserve_rt.planner.placement_file import PhasePlacement, PlacementFile, assign_nodes
from distserve_rt.planner.profiles import load_profile
from distserve_rt.planner.simulator.driven_instance import DEFAULT_BLOCK_SIZE


def add_parser(sub) -> None:
    p = sub.add_parser("plan", description=__doc__)
    planner_args.add_common(p)
    simulate_multi_turn.add_args(p)
    p.add_argument(
        "--rate",
        type=positive_float,
        required=True,
        help="traffic rate to serve, req/s (--dataset multi-turn: conversations/s)",
    )
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
        "--max-requests",
        type=positive_int,
        default=4000,
        help="most requests one stable estimate of the best candidates simulates, the "
        "warm-up included (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        default="placement.yaml",
        help="placement file to write (default: %(default)s); '' to skip",
    )
    p.add_argument(
        "--plot",
        default="",
        metavar="PATH.png",
        help="PNG: SLO attainment vs rate of the top deployments (colocated and "
        "disaggregated) and the chosen one's latency breakdown",
    )
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _row(c: Candidate, chosen: Candidate) -> dict:
    pred = c.predicted or {}
    return {
        "config": c.label(),
        "placement": c.placement.value,
        "chosen": c is chosen,
        "num_prefill": c.num_prefill,
        "num_decode": c.num_decode,
        "num_devices": c.num_devices,
        "goodput": c.goodput,
        "per_device_goodput": c.per_device,
        "unit_per_device_goodput": c.unit_per_device,
        "prefill_instance_goodput": c.prefill_goodput,
        "decode_instance_goodput": c.decode_goodput,
        "goodput_low": pred.get("goodput_low"),
        "goodput_high": pred.get("goodput_high"),
        "attainment_at_rate": pred.get("scored_attainment"),
        "attainment_half_width": pred.get("attainment_half_width"),
        "ttft_p90_s": pred.get("ttft_s", {}).get("p90"),
        "tpot_p90_s": pred.get("tpot_s", {}).get("p90"),
    }


def _shown(ranked: list[Candidate], best: Candidate, top: int) -> list[Candidate]:
    """The first ``top`` rows, and the chosen one wherever it ranks (rows above it that
    fit the cluster missed the target at the rate; a best-effort one is not among them)."""
    rows = ranked[:top]
    return rows if any(c is best for c in rows) else [*rows, best]


def _plotted(result: PlanResult, num: int = 4) -> list[Candidate]:
    """The chosen deployment and the best-ranked others, ``num`` in all, with the best
    of the other kind (colocated or disaggregated) among them when there is one: the
    picture answers "is PD even better here?"."""
    rows = [result.best, *(c for c in result.ranked if c is not result.best)]
    shown = rows[:num]
    if len({c.placement for c in shown}) == 1:
        other = next((c for c in rows if c.placement is not shown[0].placement), None)
        if other is not None:
            shown[-1] = other
    return shown


def _curves(planner: Planner, result, num: int = 4) -> dict[str, list[tuple[float, float, float]]]:
    """(rate, attainment, 95% half-width) of each plotted deployment at 0.25..1.75 x its
    goodput, simulated until stable like the answer (a short run flatters high rates)."""
    curves = {}
    for c in _plotted(result, num):
        rates = np.linspace(0.25, 1.75, 7) * c.goodput
        at = planner.refiner.attainment_or_zero
        curves[c.label()] = [(float(r), *at(c, float(r))) for r in rates]
    return curves


def _inputs(args) -> PlanInputs:
    return PlanInputs(
        model=planner_args.load_model(args.model),
        cluster=planner_args.build_cluster(args),
        workload=planner_args.build_workload(args),
        pool=planner_args.build_pool(args),
        max_requests=args.max_requests,
        slo=planner_args.build_slo(args),
        profile=load_profile(args.profile),
        dtype=args.dtype,
        rate=args.rate,
        affinity=args.affinity,
        target=args.target,
        prefill_max_batch_tokens=args.prefill_max_batch_tokens,
        rel_tol=args.rel_tol,
        seed=args.seed,
        cv=args.cv,
        show_progress=not (args.no_progress or args.json),
    )


def best_effort_note(result: PlanResult, unit: str = "req/s") -> str:
    """``best effort: sustains X req/s of the Y asked (how X was computed)``."""
    best = result.best
    if best.decode is None or best.num_decode == best.num_prefill:  # replicated whole
        how = f"{best.num_prefill} replica(s) x {best.prefill_goodput:.3g} {unit} each"
    else:
        how = (
            f"the weaker of {best.num_prefill} prefill x {best.prefill_goodput:.3g} and "
            f"{best.num_decode} decode x {best.decode_goodput:.3g} {unit}"
        )
    return (
        f"best effort: sustains {best.goodput:.3g} {unit} of the {result.inputs.rate:g} asked "
        f"({how}, at {result.inputs.target:.0%} SLO attainment)"
    )


def _plot(args, planner: Planner, result: PlanResult):
    """``--plot``: attainment vs rate of the top deployments, and the chosen one's
    latency breakdown at the rate it was predicted at, under a title with the setup."""
    from distserve_rt.planner.plot import plot_plan

    i, best = result.inputs, result.best
    breakdown = planner.refiner.attainment(best, best.predicted["rate"])[1].mean_breakdown()
    c = i.cluster
    title = (
        f"{args.model} on {c.num_nodes} x {c.devices_per_node} devices, {i.workload.name} "
        f"workload, {i.rate:g} req/s asked; SLOs TTFT {i.slo.ttft_s * 1e3:g} ms, TPOT "
        f"{i.slo.tpot_s * 1e3:g} ms at {i.target:.0%}"
    )
    chosen = f"{describe_deployment(best)} at {best.predicted['rate']:.3g} req/s"
    return plot_plan(_curves(planner, result), i.target, breakdown, chosen, title, args.plot)


def _phase(parallelism, num_instances: int) -> PhasePlacement | None:
    if parallelism is None:
        return None
    return PhasePlacement(parallelism.tp_size, parallelism.pp_size, num_instances)


def placement_file(
    args,
    result: PlanResult,
    *,
    unit: str = "req/s",
    engine: dict | None = None,
    disagg: dict | None = None,
) -> PlacementFile:
    """The file for ``result.best``; ``engine`` adds settings the plan assumed beyond the
    search's own (a multi-turn plan's prefix cache), ``disagg`` the routing settings a
    disaggregated answer was simulated with (written only when ``best`` is disaggregated:
    a colocated deployment has no decode instances to route to)."""
    inputs, best = result.inputs, result.best
    fits = best.num_devices <= inputs.cluster.num_devices
    answer = {}
    if result.best_effort:
        answer = {
            "best_effort": best_effort_note(result, unit),
            "asked_rate": inputs.rate,
            "sustained_rate": best.goodput,
        }
    prefill, decode = _phase(best.prefill, best.num_prefill), _phase(best.decode, best.num_decode)
    # Where each instance runs (serve --launcher ray places them there): a fitting plan only.
    # Algorithm-2 pairs spanning nodes are aligned: stage k of both on one node.
    dpn = inputs.cluster.devices_per_node
    nodes = assign_nodes(prefill, decode, dpn, best.num_nodes_spanned) if fits else {}
    if any(n >= inputs.cluster.num_nodes for n in _node_indices(nodes)):
        nodes = {}  # the instances do not lay out onto the cluster's nodes: left unnamed
    return PlacementFile(
        model=args.model,
        placement=best.placement.value,
        prefill=prefill,
        decode=decode,
        nodes=nodes,
        # Only a placement that fits is validated against (and written with) the cluster.
        cluster=inputs.cluster.to_dict() if fits else {},
        slo={"ttft_s": inputs.slo.ttft_s, "tpot_s": inputs.slo.tpot_s, "target": inputs.target},
        engine={**_engine_settings(inputs, best), **(engine or {})},
        disagg=dict(disagg or {}) if decode is not None else {},
        predicted={
            **answer,
            "algorithm": best.algorithm.value,
            "num_devices": best.num_devices,
            "goodput": best.goodput,
            "per_device_goodput": best.per_device,
            "unit_per_device_goodput": best.unit_per_device,
            "prefill_instance_goodput": best.prefill_goodput,
            "decode_instance_goodput": best.decode_goodput,
            **best.predicted,
        },
    )


def _node_indices(nodes: dict) -> list[int]:
    """Every node index a ``nodes`` entry names (an entry: a node, or one per PP stage)."""
    return [
        n
        for entries in nodes.values()
        for e in entries
        for n in (e if isinstance(e, list) else [e])
    ]


def _engine_settings(inputs: PlanInputs, best: Candidate) -> dict:
    """The EngineConfig settings the plan's simulated instances ran with, for `drt-run serve
    --placement` to apply: the batch budget L_m, the batch size limit, the memory fraction,
    the dtype its KV capacity and bytes were sized for, and the block size its check on
    the runtime's schedulers ran with (`planner.verify`)."""
    colocated = best.placement is PlacementKind.COLOCATED
    budget = inputs.colocated_max_batch_tokens if colocated else inputs.prefill_max_batch_tokens
    return {
        "max_num_batched_tokens": budget,
        # Planner._instance leaves build_instance's batch size limit at its default.
        "max_num_seqs": build_instance.__kwdefaults__["max_num_seqs"],
        "gpu_memory_utilization": inputs.cluster.memory_utilization,
        "dtype": inputs.dtype,
        "block_size": DEFAULT_BLOCK_SIZE,
    }


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # bad input the flags' types cannot see (e.g. the model)
        raise SystemExit(f"drt-run plan: {exc}") from None


def _run(args) -> int:
    if simulate_multi_turn.is_multi_turn(args):
        from distserve_rt.entrypoints import plan_multi_turn

        return plan_multi_turn.run(args)
    start = time.perf_counter()
    inputs = _inputs(args)
    planner = Planner(inputs)
    result = planner.run()
    seconds = time.perf_counter() - start
    placement = placement_file(args, result)
    fits = placement.num_devices <= inputs.cluster.num_devices
    out = {
        "search_seconds": seconds,
        "rate": inputs.rate,
        "placement": placement.to_dict(),
        "fits_cluster": fits,
        "best_effort": result.best_effort,
        "ranked": [_row(c, result.best) for c in _shown(result.ranked, result.best, args.top)],
        "rejected": [{"config": c, "reasons": r} for c, r in result.rejected],
    }
    if result.needed is not None:
        out["needed"] = {
            **_row(result.needed, result.best),
            "num_nodes": num_nodes_needed(result.needed, inputs.cluster.devices_per_node),
        }
    if args.output and fits:
        path = placement.save(args.output)
        if result.best_effort:  # marked in the file too, for whoever serves it later
            path.write_text(f"# {best_effort_note(result)}\n" + path.read_text())
        out["placement_file"] = str(path)
    if args.plot:
        out["plot"] = str(_plot(args, planner, result))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(out, result, inputs)
    return 0


def _print_table(out: dict, result: PlanResult, inputs: PlanInputs) -> None:
    print(
        f"deployments for {inputs.rate:g} req/s, most goodput per device first, those that "
        f"fit the cluster's {inputs.cluster.num_devices} devices before the rest "
        f"(goodput: req/s meeting the SLOs at {inputs.target:.0%}; * = chosen)"
    )
    print(
        "the first rows were simulated until stable: their goodput comes with a 95% "
        "range and their attainment with ± its 95% half-width; the rest are screened"
    )
    slo = inputs.slo
    print(f"SLOs: TTFT {slo.ttft_s * 1e3:g} ms, TPOT {slo.tpot_s * 1e3:g} ms; latencies in ms")
    print(
        f"  {'config':<30} {'P+D':>7} {'devices':>7} {'goodput':>8} {'range':>11} "
        f"{'/device':>7} {'attain':>8} {'ttft p90 ms':>11} {'tpot p90 ms':>11}"
    )
    for r in out["ranked"]:
        count = (
            f"{r['num_prefill']}+{r['num_decode']}" if r["num_decode"] else f"{r['num_prefill']}"
        )
        attain = "-" if r["attainment_at_rate"] is None else f"{r['attainment_at_rate']:.0%}"
        if r["attainment_half_width"] is not None:
            attain += f"±{r['attainment_half_width'] * 100:.0f}"
        span = (
            "-" if r["goodput_low"] is None else f"{r['goodput_low']:.3g}-{r['goodput_high']:.3g}"
        )
        # Milliseconds, the unit of the SLO flags (the JSON keeps seconds, keyed *_s).
        ttft = "-" if r["ttft_p90_s"] is None else f"{r['ttft_p90_s'] * 1e3:.1f}"
        tpot = "-" if r["tpot_p90_s"] is None else f"{r['tpot_p90_s'] * 1e3:.2f}"
        print(
            f"{'*' if r['chosen'] else ' '} {r['config']:<30} {count:>7} {r['num_devices']:>7} "
            f"{r['goodput']:>8.2f} {span:>11} {r['per_device_goodput']:>7.3f} {attain:>8} "
            f"{ttft:>11} {tpot:>11}"
        )
    best = result.best
    pred = best.predicted
    span = (
        f" ({pred['goodput_low']:.3g}-{pred['goodput_high']:.3g})" if "goodput_low" in pred else ""
    )
    print(
        f"chosen: {describe_deployment(best)} ({best.num_devices} devices, "
        f"{best.goodput:.2f}{span} req/s, {best.per_device:.3f} req/s per device; search "
        f"{out['search_seconds']:.2f} s)"
    )
    check = pred.get("policy_check")
    if check is not None:
        print(_policy_check_line(check))
    if result.best_effort:
        _print_best_effort(out, result, inputs)
    elif not best.predicted["meets_target"]:
        print(
            f"warning: simulated whole at {inputs.rate:g} req/s it meets the SLOs for "
            f"{best.predicted['scored_attainment']:.0%} of requests, below the target "
            f"{inputs.target:.0%}"
        )
    if "placement_file" in out:
        print(f"placement file: {out['placement_file']}")


def _policy_check_line(check: dict) -> str:
    """What the runtime's own schedulers made of the chosen deployment (planner/verify.py)."""
    if not check["checked"]:
        return f"not checked on the runtime's schedulers: {check['reason']}"
    return (
        f"on the runtime's schedulers ({check['num_requests']} requests): attainment "
        f"{check['attainment']:.1%} ({check['attainment_low']:.1%}-{check['attainment_high']:.1%})"
    )


def describe_deployment(c: Candidate) -> str:
    """``2 x prefill tp2pp1 + 2 x decode tp1pp1`` (or ``3 x colocated tp1pp1``)."""
    if c.decode is None:
        return f"{c.num_prefill} x colocated {parallelism_label(c.prefill)}"
    return (
        f"{c.num_prefill} x prefill {parallelism_label(c.prefill)} + "
        f"{c.num_decode} x decode {parallelism_label(c.decode)}"
    )


def _print_best_effort(out: dict, result: PlanResult, inputs: PlanInputs) -> None:
    """What the cluster can do, and what would meet the target."""
    best, needed = result.best, out["needed"]
    print(
        f"no placement on the cluster's {inputs.cluster.num_devices} devices meets the "
        f"target at {inputs.rate:g} req/s; {best_effort_note(result)}"
    )
    if not best.predicted["meets_target"]:
        print(
            f"warning: simulated whole at {best.goodput:.3g} req/s it meets the SLOs for "
            f"{best.predicted['scored_attainment']:.0%} of requests, below the target"
        )
    verdict = "meets" if result.needed.predicted["meets_target"] else "still misses"
    print(
        f"to meet {inputs.rate:g} req/s: {describe_deployment(result.needed)}, "
        f"{needed['num_devices']} devices ({needed['num_nodes']} node(s) of "
        f"{inputs.cluster.devices_per_node}); simulated whole it {verdict} the target "
        f"({needed['attainment_at_rate']:.0%})"
    )

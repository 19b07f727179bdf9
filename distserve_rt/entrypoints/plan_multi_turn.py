"""`drt-run plan --dataset multi-turn`: a placement for conversations, chosen with the
runtime's prefix cache (`planner.conversation_plan`).

``--rate`` is the conversation start rate (conversations/s, as `drt-run simulate --dataset
multi-turn --rates`); each conversation has ``--turns`` turns, the next arriving
``--think-s`` after the answer. The placement file carries ``enable_prefix_caching``, so
`drt-run serve --placement` runs with the cache the plan counted on (and refuses
``--no-enable-prefix-caching`` against a plan that assumed it on). The disaggregated
routing flags (``--local-prefill-max-tokens``, ``--local-prefill-min-queue-tokens``,
``--max-decode-load-imbalance``, ``--no-decode-prefix-caching``: serve's) set how the
disaggregated configurations are rescored and checked; a disaggregated answer's file
carries them under ``disagg`` for serve to apply and hold flags to.
"""

from __future__ import annotations

import dataclasses
import json
import time

from tqdm import tqdm

from distserve_rt.config import DisaggConfig
from distserve_rt.entrypoints import planner_args, simulate_multi_turn
from distserve_rt.entrypoints.plan import best_effort_note, describe_deployment, placement_file
from distserve_rt.planner.conversation_plan import (
    ConversationPlan,
    ConversationPlanner,
    Rescored,
    mean_turns,
)
from distserve_rt.planner.placement import PlanInputs, PlanResult
from distserve_rt.planner.profiles import load_profile
from distserve_rt.workloads.multi_turn import MULTI_TURN

UNIT = "conversations/s"
DEFAULT_NUM_CONVERSATIONS = 300
"""Conversations per rescoring run. Fewer overstate goodput: a short closed-loop run ends
before a queue near saturation shows (opt-13b, 1 x 4 devices, TTFT 120 ms / TPOT 40 ms:
colocated tp2's goodput 4.4 conversations/s with 100 conversations, 2.7 with 300, where
the answer also changed from tp2 to tp4); the throughput bound caps what is left."""


def check_args(args) -> None:
    """What a multi-turn plan cannot honour, refused by name."""
    if args.num_requests:
        raise ValueError(
            f"--num-requests does not apply to --dataset {MULTI_TURN}: give "
            "--num-conversations (each has --turns requests)"
        )
    if args.cv != 1.0:
        raise ValueError(
            f"--cv: conversations start as a Poisson process with --dataset {MULTI_TURN}"
        )


def run(args) -> int:
    check_args(args)
    start = time.perf_counter()
    model = planner_args.load_model(args.model)
    num_conversations = args.num_conversations or DEFAULT_NUM_CONVERSATIONS

    def make_workload(rate: float, num: int):
        return simulate_multi_turn.build_workload(args, rate, model, num)

    conversations = make_workload(args.rate, num_conversations)
    turns = mean_turns(conversations)
    inputs = PlanInputs(
        model=model,
        cluster=planner_args.build_cluster(args),
        workload=conversations.flat_lengths(),
        max_requests=args.max_requests,
        slo=planner_args.build_slo(args),
        profile=load_profile(args.profile),
        dtype=args.dtype,
        rate=args.rate * turns,
        affinity=args.affinity,
        target=args.target,
        prefill_max_batch_tokens=args.prefill_max_batch_tokens,
        # The colocated engine's default budget (EngineConfig): the longest turn, >= 2048.
        colocated_max_batch_tokens=max(2048, conversations.max_seq_len()),
        rel_tol=args.rel_tol,
        seed=args.seed,
        show_progress=not (args.no_progress or args.json),
        max_pp=1,  # what the rescoring simulator runs (a PP screen winner would go unscored)
    )
    caching = not args.no_prefix_caching
    dc = simulate_multi_turn.disagg_config(args)
    planner = ConversationPlanner(
        inputs,
        args.rate,
        make_workload,
        num_conversations=num_conversations,
        prefix_caching=caching,
        disagg_config=dc,
    )
    with tqdm(
        desc="plan (rescoring on conversations)", disable=not inputs.show_progress, unit="config"
    ) as bar:
        plan = planner.run(progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    seconds = time.perf_counter() - start
    result = _plan_result(plan, planner.planner.rejected)
    placement = placement_file(
        args,
        result,
        unit=UNIT,
        engine={"enable_prefix_caching": caching},
        disagg=simulate_multi_turn.disagg_settings(dc),
    )
    best = plan.best.candidate
    fits = best.num_devices <= inputs.cluster.num_devices
    out = {
        "search_seconds": seconds,
        "dataset": conversations.name,
        "conversation_rate": args.rate,
        "mean_turns": turns,
        "request_rate": inputs.rate,
        "prefix_caching": caching,
        "disagg": simulate_multi_turn.disagg_settings(dc),
        "num_conversations_per_run": num_conversations,
        "num_simulations": planner.num_simulations,
        "placement": placement.to_dict(),
        "fits_cluster": fits,
        "best_effort": plan.best_effort,
        "ranked": [_row(r, plan.best) for r in plan.ranked],
        "not_rescored": [{"config": c, "reason": why} for c, why in plan.skipped],
    }
    if plan.needed is not None:
        out["needed"] = _row(plan.needed, plan.best)
    if args.output and fits:
        path = placement.save(args.output)
        if plan.best_effort:
            path.write_text(f"# {best_effort_note(result, UNIT)}\n" + path.read_text())
        out["placement_file"] = str(path)
    if args.plot:
        out["plot"] = str(_plot(args, plan))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(out, plan, result)
    return 0


def _plot(args, plan: ConversationPlan):
    """``--plot``: attainment vs conversations/s of one unit of the top rescored
    configurations (the goodput search's points), and the chosen deployment's latency
    breakdown at the rate it was checked at."""
    from distserve_rt.planner.plot import plot_plan

    i, best = plan.inputs, plan.best
    curves = {f"{r.candidate.label()} (one unit)": list(r.curve) for r in plan.ranked[:4]}
    breakdown = best.check.breakdown if best.check is not None else best.at_goodput.breakdown
    c = i.cluster
    title = (
        f"{args.model} on {c.num_nodes} x {c.devices_per_node} devices, {i.workload.name}, "
        f"{plan.conversation_rate:g} {UNIT} asked; SLOs TTFT {i.slo.ttft_s * 1e3:g} ms, "
        f"TPOT {i.slo.tpot_s * 1e3:g} ms at {i.target:.0%}"
    )
    return plot_plan(
        curves, i.target, breakdown, describe_deployment(best.candidate), title, args.plot, UNIT
    )


def _plan_result(plan: ConversationPlan, rejected) -> PlanResult:
    """The answer as the single-turn plan's result (rates in conversations/s), for the
    placement file; ``predicted`` holds the whole-deployment check."""
    best = plan.best.candidate
    best.predicted = _predicted(plan.best, plan.inputs.target)
    inputs = dataclasses.replace(plan.inputs, rate=plan.conversation_rate)
    needed = None if plan.needed is None else plan.needed.candidate
    ranked = [r.candidate for r in plan.ranked]
    return PlanResult(inputs, best, ranked, rejected, plan.best_effort, needed)


def _predicted(r: Rescored, target: float) -> dict:
    out = {"rate_unit": UNIT, "dataset": MULTI_TURN}
    if r.check is not None:
        out.update(r.check.to_dict(), meets_target=r.check.attainment >= target)
    return out


def _row(r: Rescored, best: Rescored) -> dict:
    c, s = r.candidate, r.screened
    check = None if r.check is None else r.check.to_dict()
    return {
        "config": c.label(),
        "placement": c.placement.value,
        "chosen": r is best,
        "num_units": c.num_prefill,
        "num_devices": c.num_devices,
        "unit_goodput": c.prefill_goodput,
        "goodput": c.goodput,
        "per_device_goodput": c.per_device,
        "hit_rate_at_goodput": None if r.at_goodput is None else r.at_goodput.hit_rate,
        "screened_unit_per_device_goodput": s.unit_per_device,
        "check_at_rate": check,
    }


def _print(out: dict, plan: ConversationPlan, result: PlanResult) -> None:
    i = plan.inputs
    slo = i.slo
    print(
        f"{out['dataset']}: {plan.conversation_rate:g} {UNIT} asked ({out['mean_turns']:.2f} "
        f"turns each, ~{out['request_rate']:.3g} req/s), prefix caching "
        f"{'on' if out['prefix_caching'] else 'off'}; SLOs TTFT {slo.ttft_s * 1e3:g} ms, "
        f"TPOT {slo.tpot_s * 1e3:g} ms at {i.target:.0%}"
    )
    routing = simulate_multi_turn.routing_text(DisaggConfig(**out["disagg"]))
    if routing:
        print(f"disaggregated configurations routed as serve does with {routing}")
    print(
        "screened on the turns flattened (every turn's whole context prefilled, no cache), "
        f"then the best of each kind rescored on the runtime's schedulers with {UNIT} "
        f"closed loop ({out['num_conversations_per_run']} conversations a run); * = chosen"
    )
    print(
        f"  {'config':<30} {'units':>5} {'devices':>7} {'conv/s unit':>11} {'/device':>8} "
        f"{'hits':>5} {'screen req/s/dev':>16} {'at rate':>8}"
    )
    for r in out["ranked"]:
        hits = r["hit_rate_at_goodput"]
        check = r["check_at_rate"]
        print(
            f"{'*' if r['chosen'] else ' '} {r['config']:<30} {r['num_units']:>5} "
            f"{r['num_devices']:>7} {r['unit_goodput']:>11.3g} {r['per_device_goodput']:>8.3g} "
            f"{'-' if hits is None else f'{hits:.0%}':>5} "
            f"{r['screened_unit_per_device_goodput']:>16.3g} "
            f"{'-' if check is None else format(check['attainment'], '.0%'):>8}"
        )
    for item in out["not_rescored"]:
        print(f"not rescored: {item['config']} ({item['reason']})")
    best = plan.best
    c = best.candidate
    print(
        f"chosen: {describe_deployment(c)} ({c.num_devices} devices, {c.goodput:.3g} {UNIT}, "
        f"{c.per_device:.3g} per device; plan {out['search_seconds']:.1f} s, "
        f"{out['num_simulations']} conversation runs)"
    )
    if best.check is not None:
        print(
            f"simulated whole at {best.check.rate:.3g} {UNIT} ({best.check.num_requests} "
            f"turns): attainment {best.check.attainment:.1%}, prefix cache hit rate "
            f"{best.check.hit_rate:.0%}"
        )
    if plan.best_effort:
        print(
            f"no placement on the cluster's {i.cluster.num_devices} devices meets the target "
            f"at {plan.conversation_rate:g} {UNIT}; {best_effort_note(result, UNIT)}"
        )
        n = plan.needed.candidate
        print(
            f"to meet {plan.conversation_rate:g} {UNIT}: {describe_deployment(n)}, "
            f"{n.num_devices} devices"
        )
    if "placement_file" in out:
        print(f"placement file: {out['placement_file']}")

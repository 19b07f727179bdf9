"""`drt-run simulate --dataset multi-turn`: conversations replayed closed loop on the
scheduler-driven simulator with the runtime's prefix cache (`workloads.multi_turn`,
`planner.simulator.conversations`).

``--rates`` are conversation start rates (conversations/s); each conversation has 3-5 turns
(``--turns``), the next turn arriving ``--think-s`` (mean, exponential) after the answer.

The disaggregated routing flags (``--local-prefill-max-tokens``, ...) are serve's, with its
names and meanings: a disaggregated replay routes and conditionally disaggregates as the
runtime does with them, so what is simulated (or planned) is what serve will run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from distserve_rt.config import DisaggConfig
from distserve_rt.entrypoints.engine_args import disagg_flag, positive_int
from distserve_rt.planner.placement_file import DISAGG_KEYS
from distserve_rt.planner.simulator import ConversationSimResult
from distserve_rt.workloads.multi_turn import MULTI_TURN, MultiTurnWorkload

DEFAULT_NUM_CONVERSATIONS = 50


def add_args(p) -> None:
    """The multi-turn flags (only with ``--dataset multi-turn``)."""
    g = p.add_argument_group("multi-turn (--dataset multi-turn)")
    g.add_argument(
        "--num-conversations",
        type=positive_int,
        default=None,
        help=f"conversations per rate (default: simulate {DEFAULT_NUM_CONVERSATIONS}, plan "
        "300 per rescoring run: fewer overstate goodput)",
    )
    g.add_argument(
        "--turns",
        default=None,
        metavar="MIN,MAX",
        help="turns per conversation, drawn uniformly (default: 3,5)",
    )
    g.add_argument(
        "--think-s",
        type=float,
        default=None,
        help="mean seconds between an answer and the next turn (exponential; default: 1)",
    )
    g.add_argument(
        "--length-scale",
        type=float,
        default=None,
        help="every ShareGPT length times this (default: 1)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="simulate the runtime with --no-enable-prefix-caching (every turn recomputed)",
    )
    for name in DISAGG_KEYS:
        flag, kwargs = disagg_flag(name)
        if kwargs.get("type") is int:
            kwargs["type"] = non_negative_int
        kwargs["help"] = "disaggregated, as serve's: " + kwargs["help"]
        g.add_argument(flag, **kwargs)


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type): the routing settings' range, refused as a flag error
    rather than as DisaggConfig's field name."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


_FLAGS = ("num_conversations", "turns", "think_s", "length_scale", "no_prefix_caching")


def is_multi_turn(args) -> bool:
    """``--dataset multi-turn``; the multi-turn flags without it are refused (they would
    silently do nothing)."""
    if (getattr(args, "dataset", None) or "").lower() == MULTI_TURN:
        return True
    given = [f"--{k.replace('_', '-')}" for k in _FLAGS if getattr(args, k, None)]
    given += disagg_flags_given(args)
    if given:
        raise ValueError(f"{', '.join(given)}: only with --dataset {MULTI_TURN}")
    return False


def disagg_flags_given(args) -> list[str]:
    """The routing flags given (by name: ``--no-decode-prefix-caching`` stores False, and
    ``--local-prefill-max-tokens 0`` is given too)."""
    return [disagg_flag(k)[0] for k in DISAGG_KEYS if getattr(args, k, None) is not None]


def disagg_config(args) -> DisaggConfig:
    """The `DisaggConfig` of the routing flags (unset: its defaults, as serve's)."""
    given = {k: getattr(args, k) for k in DISAGG_KEYS if getattr(args, k, None) is not None}
    return DisaggConfig(**given)


def disagg_settings(dc: DisaggConfig) -> dict:
    """The routing settings a disaggregated replay ran with (the placement file's
    ``disagg``): all of them, defaults too, so serve refuses a flag that differs."""
    return {k: getattr(dc, k) for k in DISAGG_KEYS}


def routing_text(dc: DisaggConfig) -> str:
    """The routing settings that differ from serve's defaults, as serve's flags ("" for
    none): the table's header says what the disaggregated numbers assumed."""
    default = DisaggConfig()
    flags = []
    for key in DISAGG_KEYS:
        value = getattr(dc, key)
        if value != getattr(default, key):
            flag = disagg_flag(key)[0]
            flags.append(flag if isinstance(value, bool) else f"{flag} {value}")
    return " ".join(flags)


def check_args(args, simulator: str) -> None:
    """What the multi-turn replay cannot honour, refused by name."""
    if simulator != "scheduler":
        raise ValueError(
            f"--dataset {MULTI_TURN} needs --simulator scheduler (pp=1): the fast simulator "
            f"has no prefix cache and no closed-loop turns, got --simulator {simulator}"
        )
    if args.use_arrivals:
        raise ValueError(f"--use-arrivals replays a file; --dataset {MULTI_TURN} makes turns")
    if args.num_requests:
        raise ValueError(
            f"--num-requests does not apply to --dataset {MULTI_TURN}: give "
            f"--num-conversations (each has --turns requests)"
        )
    if args.cv != 1.0:
        raise ValueError(
            f"--cv: conversations start as a Poisson process with --dataset {MULTI_TURN}"
        )
    given = disagg_flags_given(args)
    if given and args.placement == "colocated":
        raise ValueError(
            f"{', '.join(given)}: only with --placement disaggregated (they route between "
            "prefill and decode instances), got --placement colocated"
        )


def build_workload(
    args, rate: float, model, num_conversations: int | None = None
) -> MultiTurnWorkload:
    """The conversations at start ``rate`` (conversations/s). Same ``--seed``, other rate:
    the same lengths and token ids, start times scaled by the rate. Conversations fit the
    model's context (longer draws are redrawn, see `MultiTurnWorkload.generate`).
    ``num_conversations`` overrides ``--num-conversations``."""
    turns = args.turns or "3,5"
    try:
        low, high = (int(x) for x in turns.split(","))
    except ValueError:
        raise ValueError(f"--turns must be MIN,MAX (ints), got {turns!r}") from None
    return MultiTurnWorkload.generate(
        num_conversations or args.num_conversations or DEFAULT_NUM_CONVERSATIONS,
        rate=rate,
        min_turns=low,
        max_turns=high,
        think_s=1.0 if args.think_s is None else args.think_s,
        scale=1.0 if args.length_scale is None else args.length_scale,
        vocab_size=model.vocab_size,
        max_seq_len=model.max_position_embeddings,
        seed=args.seed,
    )


def row(rate: float, got: ConversationSimResult, slo) -> dict:
    r = got.result
    return {
        "conversation_rate": rate,
        "num_conversations": int(got.conversation_ids.max()) + 1 if r.num_requests else 0,
        "num_requests": r.num_requests,
        "prefix_cache_queries": got.prefix_cache_queries,
        "prefix_cache_hits": got.prefix_cache_hits,
        "hit_rate": got.hit_rate,
        "num_local_prefills": got.num_local_prefills,
        "num_blocks_pulled": got.num_blocks_pulled,
        "num_blocks_reused": got.num_blocks_reused,
        "request_rate": _request_rate(r),
        **r.summary(slo).to_dict(),
        "mean_breakdown_s": r.mean_breakdown(),
    }


def print_table(out: dict, rows: list[dict], header: str) -> None:
    if out.get("json"):
        print(json.dumps({k: v for k, v in out.items() if k != "json"}, indent=2))
        return
    slo = out["slo"]
    print(header)
    print(
        f"SLOs: TTFT {slo['ttft_s'] * 1e3:g} ms, TPOT {slo['tpot_s'] * 1e3:g} ms; latencies in "
        f"ms; prefix caching {'on' if out['prefix_caching'] else 'off'}"
    )
    disagg = out["placement"] == "disaggregated"
    # Disaggregated: turns prefilled on a decode instance, and the migrations' KV blocks
    # pulled and found cached on the decode side (what the routing flags change).
    extra = f" {'local':>6} {'pulled':>7} {'reused':>7}" if disagg else ""
    print(
        f"{'conv/s':>8} {'req/s':>8} {'attain':>7} {'ttft p90':>9} {'tpot p90':>9} "
        f"{'hits':>6}{extra}"
    )
    for r in rows:
        extra = ""
        if disagg:
            extra = (
                f" {r['num_local_prefills']:6d} {r['num_blocks_pulled']:7d} "
                f"{r['num_blocks_reused']:7d}"
            )
        print(
            f"{r['conversation_rate']:8.3f} {r['request_rate']:8.3f} "
            f"{r['attainment']['joint']:7.1%} {r['ttft_s']['p90'] * 1e3:9.1f} "
            f"{r['tpot_s']['p90'] * 1e3:9.2f} {r['hit_rate']:6.1%}{extra}"
        )


def _request_rate(r) -> float:
    """Turns served per second: requests over first arrival to last finish."""
    finish = r.finish[np.isfinite(r.finish)]
    span = float(finish.max() - r.arrival.min()) if finish.size else 0.0
    return r.num_requests / span if span > 0 else 0.0

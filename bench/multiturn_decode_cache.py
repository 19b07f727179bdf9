r"""Multi-turn conversations on 1P2D: KV blocks and bytes moved and follow-up TTFT with the
decode instances' prefix cache off and on (and with conditional disaggregation).

Closed loop: every conversation sends its turn, all turns of a round run together, and a
conversation's next prompt is its previous prompt + the reply + a new user message. Each
configuration starts its own controller (spawned instance processes, CPU).

    PYTHONPATH=. python bench/multiturn_decode_cache.py \
        --out bench/results/multiturn_decode_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from distserve_rt.config import DisaggConfig, EngineConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.sampling_params import SamplingParams

CONFIGS = {
    "no prefix cache": dict(engine={"enable_prefix_caching": False}, disagg={}),
    "prefill cache only": dict(engine={}, disagg={"decode_prefix_caching": False}),
    "prefill + decode cache": dict(engine={}, disagg={}),
    "decode cache + local prefill <= 128": dict(
        engine={}, disagg={"local_prefill_max_tokens": 128}
    ),
}


def _conversation_prompts(num_conversations: int, first_len: int) -> list[list[int]]:
    return [
        [3 + (13 * j + 101 * c) % 500 for j in range(first_len)] for c in range(num_conversations)
    ]


def run_config(name: str, args) -> dict:
    spec = CONFIGS[name]
    config = EngineConfig(
        model=args.model, block_size=16, max_model_len=2048, max_num_batched_tokens=2048,
        kv_cache_memory_bytes=64 << 20,
        log_stats_interval_s=0, **spec["engine"],
    )  # fmt: skip
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=2))
    dc = DisaggConfig(pin_cpus=False, stats_interval_s=0.02, **spec["disagg"])
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = _conversation_prompts(args.conversations, args.first_len)
    ttft: dict[int, list[float]] = {}
    transfer: list[float] = []  # follow-ups: pull start -> end (None: prefilled locally)
    e2e: list[float] = []
    with Controller(config, placement, dc) as c:
        for turn in range(args.turns):
            for i, prompt in enumerate(prompts):
                c.add_request(f"{turn}-{i}", prompt, params)
            outs = {}
            while c.has_unfinished_requests():
                outs.update({o.request_id: o for o in c.step(0.01) if o.finished})
            ttft[turn] = [outs[f"{turn}-{i}"].metrics.ttft for i in range(len(prompts))]
            if turn:
                for i in range(len(prompts)):
                    m = outs[f"{turn}-{i}"].metrics
                    e2e.append(m.e2e_latency)
                    if m.breakdown is not None and m.breakdown.transfer is not None:
                        transfer.append(m.breakdown.transfer)
            for i in range(len(prompts)):
                user = [7 + (turn * 31 + i * 17 + j) % 490 for j in range(args.user_len)]
                prompts[i] = prompts[i] + outs[f"{turn}-{i}"].outputs[0].token_ids + user
        time.sleep(0.2)  # the last load reports
        stats = c.stats()
    decodes = [s for s in stats.instances if s.role == "decode"]
    follow_ups = [t for turn in range(1, args.turns) for t in ttft[turn]]
    return {
        "config": name,
        "blocks_pulled": sum(s.num_blocks_pulled for s in decodes),
        "blocks_reused": sum(s.num_blocks_reused for s in decodes),
        "bytes_transferred": stats.transfers.bytes,
        "num_transfers": stats.transfers.num_transfers,
        "local_prefills": sum(s.num_prefills for s in decodes),
        "decode_prefix_cache_hit_rate": (
            sum(s.prefix_cache_hits for s in decodes)
            / max(1, sum(s.prefix_cache_queries for s in decodes))
        ),
        "ttft_first_turn_mean_s": statistics.mean(ttft[0]),
        "ttft_follow_up_mean_s": statistics.mean(follow_ups),
        "ttft_follow_up_p50_s": statistics.median(follow_ups),
        "ttft_follow_up_max_s": max(follow_ups),
        "transfer_follow_up_mean_s": statistics.mean(transfer) if transfer else None,
        "e2e_follow_up_mean_s": statistics.mean(e2e),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:llama-tiny")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-len", type=int, default=300)
    p.add_argument("--user-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [run_config(name, args) for name in args.configs]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "machine": platform.processor() or platform.machine(),
                 "results": rows},
                f, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    main()

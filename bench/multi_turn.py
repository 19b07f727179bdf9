"""Multi-turn conversations on the runtime: prefix caching on vs off, colocated vs
disaggregated 1P1D, with TTFT, SLO attainment (goodput), KV bytes transferred and the
prefix-cache hit rate.

    PYTHONPATH=. .venv/bin/python bench/multi_turn.py
    PYTHONPATH=. .venv/bin/python bench/multi_turn.py --num-conversations 4 --output /tmp/mt.json

Conversations come from `workloads.multi_turn` (ShareGPT lengths x ``--length-scale``, 3-5
turns, exponential think times) and are replayed closed loop on the wall clock: a turn is
added ``think_s`` after the previous turn's answer came back, its prompt being the previous
prompt + the answer the engine gave + the new message (as a chat client sends it). Outputs
are forced (greedy, ``ignore_eos``, ``max_tokens``). Each setup runs the same conversations.

Colocated: one `LLMEngine` in this process (``--threads`` threads, default 1, the
engine's default policy), so it has half the cores 1P1D has: compare per core.
Disaggregated: the `Controller` with one prefill and one decode process, each pinned to one
core with one thread. Caching as the runtime has it at this commit (`DisaggConfig`'s
defaults): colocated pool; in 1P1D the prefill instance's pool and the decode instance's,
which keeps finished turns' KV so that a follow-up's migration pulls only the blocks it
lacks (conditional disaggregation off, its default).

For each run it also records the scheduler-driven simulator's counters for the same
conversations (the runtime's prefix caches and routing on simulated pools of the same size):
with no shared system prompt and pools that hold every conversation, prefix-cache hits and
the blocks migrations pulled and reused do not depend on timing, so the two must be equal.

Writes ``bench/results/multi_turn_cpu.json`` (command, date, commit, load average around
every run) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distserve_rt import _native
from distserve_rt.benchmarks.environment import save_result
from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.metrics.slo import SLO, summarize
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator import (
    DisaggSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.workloads.multi_turn import MultiTurnWorkload, next_prompt

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "dummy:llama-tiny"
IDLE_POLL_S = 0.02


@dataclass(frozen=True)
class Setup:
    placement: str  # "colocated" | "disaggregated_1p1d"
    caching: bool

    @property
    def label(self) -> str:
        return f"{self.placement}, cache {'on' if self.caching else 'off'}"


SETUPS = [
    Setup("colocated", False),
    Setup("colocated", True),
    Setup("disaggregated_1p1d", False),
    Setup("disaggregated_1p1d", True),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-conversations", type=int, default=20)
    p.add_argument("--rate", type=float, default=1.0, help="conversation starts per second")
    p.add_argument("--think-s", type=float, default=1.0, help="mean think time (s)")
    p.add_argument("--length-scale", type=float, default=0.15, help="ShareGPT lengths x this")
    p.add_argument("--turns", default="3,5", help="MIN,MAX turns per conversation")
    p.add_argument("--slo-ttft-ms", type=float, default=150.0)
    p.add_argument("--slo-tpot-ms", type=float, default=60.0)
    p.add_argument("--kv-tokens", type=int, default=32768, help="KV pool of each instance")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="colocated engine's threads (default 1: on a loaded 2-core machine, 2 spinning "
        "threads starved each other, TTFT p50 0.8 s instead of 60 ms)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--setups", default="all", help="comma-separated labels' indices 0-3, or all (default)"
    )
    p.add_argument("--output", default=str(RESULTS / "multi_turn_cpu.json"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for key in ("num_conversations", "kv_tokens", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    try:
        args.min_turns, args.max_turns = (int(x) for x in args.turns.split(","))
    except ValueError:
        p.error(f"--turns must be MIN,MAX (ints), got {args.turns!r}")
    return args


def make_engine(setup: Setup, args, bytes_per_token: int, max_model_len: int):
    config = EngineConfig(
        model=MODEL,
        kv_cache_memory_bytes=args.kv_tokens * bytes_per_token,
        max_model_len=max_model_len,
        log_stats_interval_s=0.0,
        enable_prefix_caching=setup.caching,
    )
    if setup.placement == "colocated":
        from distserve_rt.engine.llm_engine import LLMEngine

        return LLMEngine(config)
    from distserve_rt.engine.controller import Controller  # spawns processes

    return Controller(config, Placement.disaggregated(), DisaggConfig())


def replay(engine, workload: MultiTurnWorkload, bar: tqdm) -> dict:
    """The conversations closed loop on the wall clock; per-request TTFT/TPOT (s)."""
    pending: list[tuple[float, int, int, list[int]]] = [
        (c.start_s, i, 0, next_prompt([], [], c.turns[0]))
        for i, c in enumerate(workload.conversations)
    ]
    prompts: dict[str, tuple[int, int, list[int]]] = {}
    ttft, tpot, errors = [], [], 0
    start = time.monotonic()
    last_finish = start
    while pending or engine.has_unfinished_requests():
        now = time.monotonic() - start
        pending.sort(key=lambda x: x[0])
        while pending and pending[0][0] <= now:
            at, c, k, prompt = pending.pop(0)
            turn = workload.conversations[c].turns[k]
            params = SamplingParams(temperature=0.0, max_tokens=turn.output_len, ignore_eos=True)
            rid = f"c{c}t{k}"
            engine.add_request(rid, prompt, params, arrival_time=start + at)
            prompts[rid] = (c, k, prompt)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(pending[0][0] - now, 0.5)))
            continue
        wait = max(0.0, min((pending[0][0] - now) if pending else IDLE_POLL_S, IDLE_POLL_S))
        for out in engine.step(wait):
            if not out.finished:
                continue
            bar.update(1)
            c, k, prompt = prompts.pop(out.request_id)
            m = out.metrics
            if out.outputs[0].finish_reason != "length" or m.ttft is None:
                errors += 1  # a failed turn ends its conversation, as a client would
                continue
            ttft.append(m.ttft)
            tpot.append(m.tpot or 0.0)
            last_finish = max(last_finish, m.finished_time or start)
            turns = workload.conversations[c].turns
            if k + 1 < len(turns):
                answer = out.outputs[0].token_ids
                nxt = next_prompt(prompt, answer, turns[k + 1])
                done_s = (m.finished_time or time.monotonic()) - start
                pending.append((done_s + turns[k].think_s, c, k + 1, nxt))
    first = workload.conversations[0].start_s
    return {
        "ttft": np.asarray(ttft),
        "tpot": np.asarray(tpot),
        "num_errors": errors,
        "duration_s": last_finish - start - first,
    }


@dataclass(frozen=True)
class _UnitLatency(LatencyModel):
    """Any step time: with an ample pool and no shared prefix, hits do not depend on it."""

    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return 1e-3 * (1 + num_tokens)

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return 1e-3, 0.0


def simulated_counters(setup: Setup, engine, workload, kv_tokens: int, max_model_len: int):
    """The simulator's `ConversationSimResult` for ``workload`` on ``engine``'s settings (a
    colocated engine's own pool size: it may be below ``kv_tokens``): prefix-cache queries
    and hits, and (1P1D) the blocks migrations pulled and reused."""
    sc = engine.scheduler_config
    if setup.placement == "colocated":
        bm = engine.block_manager
        kv_tokens = bm.num_blocks * bm.block_size
    inst = SimInstanceSpec(
        _UnitLatency(),
        kv_tokens,
        max_batch_tokens=sc.max_num_batched_tokens,
        max_num_seqs=sc.max_num_seqs,
    )
    if setup.placement == "colocated":
        sim = SchedulerDrivenColocated(
            inst,
            engine.config.policy,
            block_size=engine.config.block_size,
            max_model_len=max_model_len,
        )
    else:
        sim = SchedulerDrivenDisaggregated(
            DisaggSpec(inst, inst),
            block_size=engine.config.block_size,
            max_model_len=max_model_len,
        )
    if setup.placement == "colocated":
        return sim.run_conversations(workload, prefix_caching=setup.caching)
    return sim.run_conversations(
        workload, prefix_caching=setup.caching, disagg_config=engine.disagg_config
    )


def run_setup(setup: Setup, args, workload, bytes_per_token: int, max_model_len: int) -> dict:
    load_before = list(os.getloadavg())
    engine = make_engine(setup, args, bytes_per_token, max_model_len)
    try:
        with tqdm(total=workload.num_requests, desc=setup.label, unit="turn") as bar:
            got = replay(engine, workload, bar)
        if setup.placement != "colocated":
            # The instances' counters come with their periodic load reports: let the last
            # ones (sent after the final turn) arrive before reading them.
            until = time.monotonic() + 4 * engine.disagg_config.stats_interval_s
            while time.monotonic() < until:
                engine.step(IDLE_POLL_S)
        stats = engine.stats()
        sim = simulated_counters(setup, engine, workload, args.kv_tokens, max_model_len)
    finally:
        engine.shutdown()
    queries = sum(s.prefix_cache_queries for s in stats.instances)
    hits = sum(s.prefix_cache_hits for s in stats.instances)
    pulled = sum(s.num_blocks_pulled for s in stats.instances)
    reused = sum(s.num_blocks_reused for s in stats.instances)
    slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    n = workload.num_requests
    # Failed turns and the turns their conversation never sent count as missing the SLO.
    missing = n - got["ttft"].size
    ttft = np.concatenate([got["ttft"], np.full(missing, np.inf)])
    tpot = np.concatenate([got["tpot"], np.full(missing, np.inf)])
    summary = summarize(ttft, tpot, slo, max(got["duration_s"], 1e-9)).to_dict()
    return {
        "setup": setup.label,
        "placement": setup.placement,
        "prefix_caching": setup.caching,
        "num_requests": n,
        "num_errors": got["num_errors"],
        "duration_s": got["duration_s"],
        **summary,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": hits / queries if queries else 0.0,
        "simulated_prefix_cache_queries": sim.prefix_cache_queries,
        "simulated_prefix_cache_hits": sim.prefix_cache_hits,
        "kv_bytes_transferred": stats.transfers.bytes,
        "num_transfers": stats.transfers.num_transfers,
        # Decode instances: migrated KV blocks copied vs found in their own cache.
        "num_blocks_pulled": pulled,
        "num_blocks_reused": reused,
        "simulated_num_blocks_pulled": sim.num_blocks_pulled,
        "simulated_num_blocks_reused": sim.num_blocks_reused,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }


def plot(path: Path, runs: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["setup"].replace(", ", "\n").replace("disaggregated_1p1d", "1P1D") for r in runs]
    x = np.arange(len(runs))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    panels = [
        ("TTFT (ms): p50 bar, p90 tick", [r["ttft_s"]["p50"] * 1e3 for r in runs]),
        ("SLO attainment (%)", [r["attainment"]["joint"] * 100 for r in runs]),
        ("prefix-cache hit rate (%)", [r["hit_rate"] * 100 for r in runs]),
        ("KV transferred (MiB)", [r["kv_bytes_transferred"] / 2**20 for r in runs]),
    ]
    for ax, (name, values) in zip(axes, panels, strict=True):
        ax.bar(x, values, color=["#999", "#37a", "#c96", "#a42"][: len(runs)])
        ax.set_title(name, fontsize=10)
        ax.set_xticks(x, labels, fontsize=8)
    axes[0].scatter(x, [r["ttft_s"]["p90"] * 1e3 for r in runs], marker="_", s=300, c="k")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    _native.set_num_threads(args.threads)
    from distserve_rt.models.presets import get_preset

    cfg = get_preset(MODEL.split(":", 1)[1])
    bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 K and V
    workload = MultiTurnWorkload.generate(
        args.num_conversations,
        rate=args.rate,
        min_turns=args.min_turns,
        max_turns=args.max_turns,
        think_s=args.think_s,
        scale=args.length_scale,
        max_seq_len=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        seed=args.seed,
    )
    max_model_len = workload.max_seq_len()
    chosen = SETUPS if args.setups == "all" else [SETUPS[int(i)] for i in args.setups.split(",")]
    print(f"{workload.name}: {workload.describe()}", file=sys.stderr)
    runs = [run_setup(s, args, workload, bytes_per_token, max_model_len) for s in chosen]
    for r in runs:
        print(
            f"{r['setup']:>32}: TTFT p50 {r['ttft_s']['p50'] * 1e3:7.1f} ms p90 "
            f"{r['ttft_s']['p90'] * 1e3:7.1f} ms, attainment {r['attainment']['joint']:6.1%}, "
            f"hit rate {r['hit_rate']:5.1%} (sim {r['simulated_prefix_cache_hits']} vs "
            f"{r['prefix_cache_hits']} tokens), KV moved "
            f"{r['kv_bytes_transferred'] / 2**20:.1f} MiB, blocks pulled/reused "
            f"{r['num_blocks_pulled']}/{r['num_blocks_reused']} (sim "
            f"{r['simulated_num_blocks_pulled']}/{r['simulated_num_blocks_reused']})"
        )
    title = (
        f"{MODEL} on CPU, {workload.num_conversations} conversations ({workload.num_requests} "
        f"turns, ShareGPT x{args.length_scale:g}, {args.min_turns}-{args.max_turns} turns, "
        f"{args.rate:g} conv/s, think {args.think_s:g} s); SLO TTFT {args.slo_ttft_ms:g} ms, "
        f"TPOT {args.slo_tpot_ms:g} ms; colocated {args.threads} threads, 1P1D 1 core each"
    )
    out = save_result(
        args.output,
        {
            "benchmark": "multi_turn",
            # The line to re-run it from the repository root (argv[0] alone is the file name).
            "command": " ".join(
                ["PYTHONPATH=.", ".venv/bin/python", "bench/multi_turn.py"] + sys.argv[1:]
            ),
            "model": MODEL,
            "workload": {**workload.describe(), "name": workload.name, "seed": args.seed},
            "settings": {k: v for k, v in vars(args).items() if k not in ("output",)},
            "slo": {"ttft_s": args.slo_ttft_ms / 1e3, "tpot_s": args.slo_tpot_ms / 1e3},
            "title": title,
            "runs": runs,
        },
    )
    if not args.no_plot:
        plot(out.with_suffix(".png"), runs, title)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

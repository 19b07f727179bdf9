"""The pure parts of the peer benchmark: provenance, summaries, ratios, bench-result parsing
and the plot. No engine is imported here, so the unit tests run without vLLM.

Every ratio is oriented so that > 1 means distserve_rt is better: ours / peer for
throughput and goodput, peer / ours for TTFT, TPOT and memory (lower is better).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
from pathlib import Path

PEER = "vllm"
OURS = ("drt_colocated", "drt_disaggregated")
SETUPS = (PEER, *OURS)
LABELS = {
    PEER: "vLLM-CPU",
    "drt_colocated": "distserve_rt colocated",
    "drt_disaggregated": "distserve_rt disaggregated 1P1D",
}
# BENCHMARKS.md, "CPU engine" row: >= 1.2x throughput, <= its TPOT, >= its goodput,
# <= its peak RSS. In our orientation (> 1 = better) every target is a lower bound.
TARGETS = {"offline_output_throughput": 1.2, "tpot_batch1": 1.0, "goodput": 1.0, "memory": 1.0}

# Scalars kept from a `vllm bench serve --save-result` JSON (per-request lists are dropped).
BENCH_KEYS = (
    "completed", "failed", "num_prompts", "request_rate", "duration", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "max_concurrency", "burstiness",
)  # fmt: skip
BENCH_METRICS = ("ttft", "tpot", "itl", "e2el")


# --- provenance ---------------------------------------------------------------------------


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(root: Path) -> str:
    """Short commit, "-dirty" when tracked files differ (the numbers may not be the commit's)."""
    try:
        run = lambda *a: subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def cpu_info(text: str) -> dict[str, object]:
    """CPU model and the SIMD features both engines' kernels dispatch on, from /proc/cpuinfo.

    vLLM-CPU ships AVX2, AVX-512 and AVX-512-BF16/AMX builds of its kernels; which one a
    machine gets moves its speed a lot, so the result must say it.
    """
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    simd = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")}
    simd["amx"] = any(f.startswith("amx") for f in flags)
    return {"cpu": model, "simd": simd, "isa": isa_label(simd)}


def isa_label(simd: dict[str, bool]) -> str:
    if simd.get("amx"):
        return "AMX"
    if simd.get("avx512_bf16"):
        return "AVX-512 BF16"
    if simd.get("avx512f"):
        return "AVX-512"
    return "AVX2" if simd.get("avx2") else "no AVX2"


def machine() -> dict[str, object]:
    try:
        info = cpu_info(Path("/proc/cpuinfo").read_text())
    except OSError:
        info = cpu_info("")
    return {
        **info,
        "nproc": len(os.sched_getaffinity(0)),
        "num_cpus": os.cpu_count(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe_model(config: dict) -> str:
    """One line for plot titles: the shape both engines ran."""
    heads = f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads"
    return (
        f"Llama {config['num_hidden_layers']}L h{config['hidden_size']} {heads} "
        f"ffn {config['intermediate_size']} vocab {config['vocab_size']} "
        f"{config.get('torch_dtype', '')}"
    ).strip()


# --- comparisons --------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0
    (a goodput of 0 has no meaningful ratio; the raw numbers say what happened)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def token_agreement(ours: list[int] | None, peer: list[int] | None) -> dict[str, object]:
    """How far two greedy outputs agree. bf16 rounding differs between the engines' kernels,
    so a near-tie between two logits can flip one token and everything after it diverges:
    the common prefix says where, the equal fraction how much."""
    if not ours or not peer:
        return {"compared": 0, "common_prefix": 0, "equal_fraction": None}
    n = min(len(ours), len(peer))
    prefix = next((i for i in range(n) if ours[i] != peer[i]), n)
    equal = sum(a == b for a, b in zip(ours, peer, strict=False))
    return {"compared": n, "common_prefix": prefix, "equal_fraction": equal / n}


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _max(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize_offline(runs: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per setup: medians over repeats (throughput, latency), maxima for memory peaks."""
    out: dict[str, dict[str, float | None]] = {}
    for setup in SETUPS:
        mine = [r for r in runs if r["setup"] == setup and "result" in r]
        if not mine:
            continue
        tput = [r["result"].get("throughput", {}) for r in mine]
        lat = [r["result"].get("latency", {}) for r in mine]
        mem = [r.get("memory", {}) for r in mine]
        out[setup] = {
            "repeats": len(mine),
            "output_tok_s": _median([t.get("output_tok_s") for t in tput]),
            "total_tok_s": _median([t.get("total_tok_s") for t in tput]),
            "ttft_s": _median([x.get("ttft_s") for x in lat]),
            "tpot_s": _median([x.get("tpot_s") for x in lat]),
            "peak_rss_tree_bytes": _max([m.get("peak_rss_tree_bytes") for m in mem]),
            "peak_pss_tree_bytes": _max([m.get("peak_pss_tree_bytes") for m in mem]),
        }
    return out


def offline_ratios(summary: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    peer = summary.get(PEER)
    out: dict[str, dict[str, float | None]] = {}
    if not peer:
        return out
    for setup in OURS:
        ours = summary.get(setup)
        if not ours:
            continue
        out[setup] = {
            "output_throughput": ratio(ours["output_tok_s"], peer.get("output_tok_s")),
            "total_throughput": ratio(ours["total_tok_s"], peer.get("total_tok_s")),
            "ttft_batch1": ratio(peer.get("ttft_s"), ours["ttft_s"]),
            "tpot_batch1": ratio(peer.get("tpot_s"), ours["tpot_s"]),
            "peak_rss": ratio(peer.get("peak_rss_tree_bytes"), ours["peak_rss_tree_bytes"]),
            "peak_pss": ratio(peer.get("peak_pss_tree_bytes"), ours["peak_pss_tree_bytes"]),
        }
    return out


def serving_ratios(serving: dict[str, dict]) -> dict[str, dict[str, object]]:
    """Per our setup: goodput and throughput ratios per rate, and the memory ratio."""
    peer = serving.get(PEER)
    out: dict[str, dict[str, object]] = {}
    if not peer:
        return out
    for setup in OURS:
        ours = serving.get(setup)
        if not ours:
            continue
        per_rate = {}
        for rate, mine in ours.get("rates", {}).items():
            theirs = peer.get("rates", {}).get(rate, {})
            per_rate[rate] = {
                "request_goodput": ratio(
                    mine.get("request_goodput"), theirs.get("request_goodput")
                ),
                "output_throughput": ratio(
                    mine.get("output_throughput"), theirs.get("output_throughput")
                ),
                "mean_ttft": ratio(theirs.get("mean_ttft_ms"), mine.get("mean_ttft_ms")),
                "mean_tpot": ratio(theirs.get("mean_tpot_ms"), mine.get("mean_tpot_ms")),
            }
        peer_mem, our_mem = peer.get("memory", {}), ours.get("memory", {})
        out[setup] = {
            "rates": per_rate,
            "peak_rss": ratio(
                peer_mem.get("peak_rss_tree_bytes"), our_mem.get("peak_rss_tree_bytes")
            ),
            "peak_pss": ratio(
                peer_mem.get("peak_pss_tree_bytes"), our_mem.get("peak_pss_tree_bytes")
            ),
        }
    return out


def targets_met(ratios: dict[str, dict]) -> dict[str, object]:
    """BENCHMARKS.md's CPU-engine targets, checked on the colocated setup (None: not measured)."""
    off = ratios.get("offline", {}).get("drt_colocated", {})
    srv = ratios.get("serving", {}).get("drt_colocated", {})
    goodputs = [r["request_goodput"] for r in srv.get("rates", {}).values()]
    at_least = lambda value, target: None if value is None else value >= target
    goodput_ok = None
    if goodputs and all(g is not None for g in goodputs):
        goodput_ok = all(g >= TARGETS["goodput"] for g in goodputs)
    return {
        "targets": TARGETS,
        "throughput": at_least(off.get("output_throughput"), TARGETS["offline_output_throughput"]),
        "tpot": at_least(off.get("tpot_batch1"), TARGETS["tpot_batch1"]),
        "goodput_every_rate": goodput_ok,
        "memory_offline": at_least(off.get("peak_rss"), TARGETS["memory"]),
        "memory_serving": at_least(srv.get("peak_rss"), TARGETS["memory"]),
    }


# --- vllm bench serve results -------------------------------------------------------------


def parse_bench_result(data: dict | str | Path) -> dict[str, object]:
    """The scalars of one `vllm bench serve --save-result` JSON (a dict, text or a path):
    counts, throughputs, request goodput and mean/median/p50/p90/p99 of TTFT/TPOT/ITL/E2E."""
    if isinstance(data, Path):
        data = data.read_text()
    if isinstance(data, str):
        data = json.loads(data)
    if "completed" not in data or "mean_ttft_ms" not in data:
        raise ValueError("not a vllm bench serve result: no 'completed' / 'mean_ttft_ms'")
    out = {k: data[k] for k in BENCH_KEYS if k in data}
    for key, value in data.items():
        metric = key.removesuffix("_ms").rpartition("_")[2]
        if key.endswith("_ms") and metric in BENCH_METRICS and isinstance(value, (int, float)):
            out[key] = value
    out.setdefault("request_goodput", None)  # absent when --goodput was not given
    if "failed" not in out and "errors" in data:
        out["failed"] = sum(1 for e in data["errors"] if e)
    return out


# --- plot ---------------------------------------------------------------------------------


def _ratio_bars(ratios: dict) -> list[tuple[str, float]]:
    bars = []
    names = {"drt_colocated": "coloc", "drt_disaggregated": "disagg"}
    for setup, r in ratios.get("offline", {}).items():
        short = names[setup]
        for key, label in (
            ("output_throughput", "offline out tok/s"),
            ("ttft_batch1", "TTFT b1"),
            ("tpot_batch1", "TPOT b1"),
            ("peak_rss", "peak RSS offline"),
        ):
            if r.get(key) is not None:
                bars.append((f"{label}\n{short}", r[key]))
    for setup, r in ratios.get("serving", {}).items():
        for rate, per_rate in r.get("rates", {}).items():
            if per_rate.get("request_goodput") is not None:
                bars.append((f"goodput @{rate}/s\n{names[setup]}", per_rate["request_goodput"]))
        if r.get("peak_rss") is not None:
            bars.append((f"peak RSS serving\n{names[setup]}", r["peak_rss"]))
    return bars


def plot(result: dict, path: Path) -> Path:
    """Left: every ratio (> 1: distserve_rt better). Right: goodput vs rate per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    bars = _ratio_bars(result.get("ratios", {}))
    if bars:
        labels, values = zip(*bars, strict=True)
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        left.bar(range(len(values)), values, color=colors)
        left.set_xticks(range(len(values)), labels, fontsize=7, rotation=45, ha="right")
        for i, v in enumerate(values):
            left.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    left.axhline(1.0, color="black", lw=0.8)
    left.axhline(TARGETS["offline_output_throughput"], color="gray", ls=":", lw=0.8)
    left.set_ylabel("ratio (> 1: distserve_rt better)")
    left.set_title("distserve_rt vs vLLM-CPU (throughput: ours/peer; latency, memory: peer/ours)")
    for setup, data in result.get("serving", {}).get("servers", {}).items():
        rates = sorted(data.get("rates", {}), key=float)
        goodput = [data["rates"][r].get("request_goodput") or 0.0 for r in rates]
        right.plot([float(r) for r in rates], goodput, marker="o", label=LABELS.get(setup, setup))
    right.set_xlabel("request rate (req/s, Poisson)")
    right.set_ylabel("request goodput (req/s meeting both SLOs)")
    right.set_title("vllm bench serve goodput")
    if right.lines:
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(plot_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_title(result: dict) -> str:
    setup = result.get("setup", {})
    mach = result.get("machine", {})
    slo = setup.get("slo", {})
    return (
        f"{setup.get('model_shape', '')}; {setup.get('threads')} threads; {mach.get('cpu')} "
        f"({mach.get('isa')}, {mach.get('nproc')} cpus); SLOs TTFT <= {slo.get('ttft_ms')} ms, "
        f"TPOT <= {slo.get('tpot_ms')} ms\n{result.get('date')} commit {result.get('git_commit')}"
        f"; vllm-cpu {result.get('versions', {}).get('vllm', {}).get('vllm')}"
    )

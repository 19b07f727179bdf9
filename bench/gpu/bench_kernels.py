"""GPU kernel benchmarks of distserve_rt._cuda against torch, read against measured ceilings.

Run on a GPU machine (bench/gpu/first_run.sh runs --quick, second_run.sh the full grid):
    python bench/gpu/bench_kernels.py --out <folder> [--quick]
Writes <folder>/gpu_kernels.json (provenance, ceilings, every timing) and
<folder>/gpu_kernels.png (achieved fraction of the ceiling per case), prints a table last.
Every variant is checked against an fp32 reference before it is timed; a variant that fails
its check is reported and not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # gpu_timing/gpu_cases, then distserve_rt

import torch  # noqa: E402
from gpu_cases import GpuCase, copy_blocks_case, decode_case, prefill_case, write_kv_case  # noqa: E402
from gpu_timing import Timer, copy_bandwidth_gbs, environment, matmul_tflops  # noqa: E402


def cases(quick: bool):
    """Case factories (built one at a time so that only one case's buffers are alive)."""
    if quick:
        yield lambda: prefill_case(2048, 2)
        yield lambda: decode_case(32, 4096)
        yield lambda: write_kv_case()
        yield lambda: copy_blocks_case(64, 256 << 10)
        return
    for seq_len, num_seqs in [(2048, 4), (4096, 2), (8192, 1)]:
        yield lambda s=seq_len, n=num_seqs: prefill_case(s, n)
    yield lambda: prefill_case(4096, 2, dtype=torch.float16)
    yield lambda: prefill_case(4096, 2, head_dim=64)
    yield lambda: prefill_case(4096, 2, slot_mapping=True)  # the engine's call: fused write_kv
    # 16 tokens x group 4 = 64 rows: the 64-row M-tile kernel (longer prompts take 128 rows).
    yield lambda: prefill_case(16, 256)
    # (1, 4096): batch x KV heads alone fill under half an H200; the planner adds splits.
    for batch, ctx in [(1, 4096), (32, 4096), (64, 4096), (32, 8192), (8, 32768)]:
        yield lambda b=batch, c=ctx: decode_case(b, c)
    for heads, kv_heads in [(32, 32), (64, 8)]:  # GQA group 1 and 8 beside 4 above
        yield lambda h=heads, k=kv_heads: decode_case(32, 4096, h, k)
    yield lambda: decode_case(32, 4096, block_size=32)
    yield lambda: write_kv_case()
    yield lambda: copy_blocks_case(256, 2 << 20)  # a 7B-class request: 2 MiB blocks
    yield lambda: copy_blocks_case(64, 256 << 10)  # small request: fixed cost shows


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host time to enqueue one call (what a request pays on the CPU), GPU not waited for."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def achieved(case: GpuCase, ms: float, ceilings: dict[str, float]) -> dict[str, float]:
    if case.flops:
        tflops = case.flops / (ms * 1e-3) / 1e12
        return {"tflops": tflops, "fraction_of_ceiling": tflops / ceilings["matmul_tflops"]}
    gbs = case.bytes_moved / (ms * 1e-3) / 1e9
    return {"gbs": gbs, "fraction_of_ceiling": gbs / ceilings["copy_gbs"]}


def run_case(case: GpuCase, timer: Timer, ceilings: dict[str, float]) -> list[dict]:
    rows = []
    errors = case.check()
    base = {"op": case.op, "params": case.params, **case.extra}
    for name, fn in case.ours.items():
        row = {**base, "variant": name, "kind": "ours", "rel_error": errors[name]}
        if not errors[name] <= case.tolerance:  # NaN-safe: inf never passes
            row["status"] = f"WRONG: relative error {errors[name]:.3g} > {case.tolerance}"
        else:
            ms = timer.median_ms(fn, graph=case.graph)
            row.update(status="ok", ms=ms, **achieved(case, ms, ceilings))
            if case.op == "copy_blocks":
                row["host_us_per_call"] = host_us_per_call(fn)
        rows.append(row)
    for name, fn in case.baselines.items():
        row = {**base, "variant": name, "kind": "baseline"}
        try:
            ms = timer.median_ms(fn)
            row.update(status="ok", ms=ms, **achieved(case, ms, ceilings))
        except RuntimeError as exc:  # e.g. a backend that does not take these inputs
            row["status"] = f"unavailable: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    best = min((r["ms"] for r in rows if r["kind"] == "baseline" and "ms" in r), default=None)
    for row in rows:
        if row["kind"] == "ours" and "ms" in row and best is not None:
            row["speedup_vs_best_baseline"] = best / row["ms"]
    return rows


def label(row: dict) -> str:
    return row["op"] + " " + " ".join(f"{k}={v}" for k, v in row["params"].items())


def print_table(rows: list[dict], ceilings: dict[str, float]) -> None:
    print(
        f"\nceilings: copy {ceilings['copy_gbs']:.0f} GB/s (read+write), "
        f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s"
    )
    print(f"{'case':62} {'variant':18} {'ms':>9} {'rate':>12} {'%ceil':>6} {'x best':>7}")
    for row in rows:
        if "ms" not in row:
            print(f"{label(row)[:62]:62} {row['variant']:18} {row['status'][:40]}")
            continue
        rate = f"{row['tflops']:.0f} TFLOP/s" if "tflops" in row else f"{row['gbs']:.0f} GB/s"
        speedup = row.get("speedup_vs_best_baseline")
        speedup_text = "" if speedup is None else f"{speedup:6.2f}x"
        print(
            f"{label(row)[:62]:62} {row['variant']:18} {row['ms']:9.4f} {rate:>12} "
            f"{100 * row['fraction_of_ceiling']:5.1f}% {speedup_text}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "ms" in r]
    names = [f"{label(r)[:58]} | {r['variant']}" for r in timed]
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(timed) + 1.5))
    colors = ["tab:blue" if r["kind"] == "ours" else "tab:gray" for r in timed]
    ax.barh(range(len(timed)), [100 * r["fraction_of_ceiling"] for r in timed], color=colors)
    ax.set_yticks(range(len(timed)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of measured ceiling (copy GB/s or bf16 matmul TFLOP/s); blue = ours")
    ax.set_title("distserve_rt CUDA kernels vs torch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "results")
    parser.add_argument("--quick", action="store_true", help="one small case per op")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # A non-default stream: cudaMemcpyBatchAsync refuses the legacy default stream, and
    # every variant then runs on the same stream.
    with torch.cuda.stream(torch.cuda.Stream()):
        timer = Timer()
        ceilings = {"copy_gbs": copy_bandwidth_gbs(timer), "matmul_tflops": matmul_tflops(timer)}
        rows: list[dict] = []
        for make in cases(args.quick):
            case = make()
            rows += run_case(case, timer, ceilings)
            print_table(rows[-len(case.ours) - len(case.baselines) :], ceilings)
            del case
            gc.collect()
            torch.cuda.empty_cache()
    payload = {**environment(), "ceilings": ceilings, "results": rows}
    (args.out / "gpu_kernels.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot(rows, args.out / "gpu_kernels.png")
    print_table(rows, ceilings)
    wrong = [r for r in rows if str(r.get("status", "")).startswith("WRONG")]
    return 1 if wrong or any(math.isinf(r.get("rel_error", 0.0)) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

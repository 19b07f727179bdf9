"""Tokens/s of `LLM` on a tiny model at several TP x PP layouts (CPU: gloo processes).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python -m distserve_rt.benchmarks.parallel_engine \
        --layouts 1x1 2x1 1x2 --json bench/results/parallel_cpu.json

Each layout generates the same greedy batch (prompts of `--prompt-len` tokens, `--max-tokens`
each) after one warm-up batch; reported: wall seconds and output tokens/s. On a small CPU
box expect TP/PP to be slower than one process (gloo all-reduce and stage hand-offs cost
more than the tiny layers they split); the point is recording the cost honestly.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from distserve_rt import LLM, SamplingParams


def run_layout(args: argparse.Namespace, tp: int, pp: int) -> dict:
    llm = LLM(
        args.model,
        dtype="float32",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_num_seqs=args.num_prompts,
        kv_cache_memory_bytes=64 << 20,
        log_stats_interval_s=0,
    )
    prompts = [
        {"prompt_token_ids": [3 + (7 * i + j) % 400 for j in range(args.prompt_len)]}
        for i in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    try:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.shutdown()
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "tp": tp,
        "pp": pp,
        "seconds": round(seconds, 4),
        "output_tokens_per_s": round(num_tokens / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dummy:llama-tiny")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.lower().split("x"))
        rows.append(run_layout(args, tp, pp))
        print(json.dumps(rows[-1]))
    result = {
        "command": "python -m distserve_rt.benchmarks.parallel_engine "
        + " ".join(
            f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(v)}"
            for k, v in vars(args).items()
            if k != "json"
        ),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "results": rows,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""`drt-run generate`: a few prompts through `LLM` (colocated or disaggregated), printing the
text and each request's TTFT / TPOT (and, disaggregated, where the time went)."""

from __future__ import annotations

import argparse

from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.llm import LLM
from distserve_rt.entrypoints.engine_args import (
    add_engine_args,
    check_device,
    configs_from_args,
)
from distserve_rt.sampling_params import SamplingParams


def add_parser(sub) -> None:
    p = sub.add_parser("generate", description=__doc__)
    p.add_argument("prompts", nargs="*", default=["Hello, my name is"], help="prompt texts")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    s.add_argument("--ignore-eos", action="store_true")
    add_engine_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        config, placement, disagg = configs_from_args(args)
        check_device(config.device)
    except ValueError as exc:
        raise SystemExit(f"drt-run generate: {exc}") from None
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.sampling_seed, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
    )  # fmt: skip
    # The configs as built: LLM's keywords are vLLM's (a CPU run refuses
    # gpu_memory_utilization, which EngineConfig always holds).
    with LLM.from_engine(make_engine_core(config, placement, disagg)) as llm:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for out in outputs:
        c, m = out.outputs[0], out.metrics
        print(f"--- {out.prompt!r}\n{c.text!r}")
        tpot = f"{m.tpot * 1e3:.1f} ms" if m.tpot is not None else "-"
        print(f"[{len(c.token_ids)} tokens, {c.finish_reason}] TTFT {m.ttft * 1e3:.1f} ms, "
              f"TPOT {tpot}" + (f", error: {out.error}" if out.error else ""))  # fmt: skip
        if m.breakdown is not None:
            parts = ", ".join(
                f"{k} {v * 1e3:.1f} ms"
                for k, v in (
                    ("prefill queue", m.breakdown.prefill_queue),
                    ("prefill", m.breakdown.prefill),
                    ("transfer queue", m.breakdown.transfer_queue),
                    ("transfer", m.breakdown.transfer),
                    ("decode queue", m.breakdown.decode_queue),
                    ("decode", m.breakdown.decode),
                )
                if v is not None
            )
            print(f"  breakdown: {parts}")
    return 0

"""Where a colocated engine step's time goes on CPU: decode steps at a fixed batch (and one
prefill step), by part of the step.

Run: ``PYTHONPATH=. python -m distserve_rt.benchmarks.step_profile --model DIR --batch 1 64
--json bench/results/engine_profile_cpu.json`` (``bench/peer/make_model.py`` writes issue
16's 8-layer bf16 Llama; ``dummy:llama-tiny`` works too).

Two measurements per batch size: the wall time of plain `LLMEngine.step` calls (the number
to compare), and one pass under cProfile, whose per-function times are grouped into the
parts of a step: GEMMs (the layers' linear ops; the LM head separately), attention (KV
write + paged attention), the fused elementwise ops, embedding, sampling, scheduling, input
preparation, and the rest of the Python and torch work of the forward ("model overhead").
cProfile slows Python code, so the parts are reported as fractions of the profiled step,
next to the unprofiled step time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np
import torch

from distserve_rt import _native
from distserve_rt.benchmarks.environment import save_result
from distserve_rt.engine import LLM
from distserve_rt.sampling_params import SamplingParams

# Part of the step -> names of the native (pybind11 / torch C) calls whose own time it is.
NATIVE_PARTS = {
    "gemm": ("linear",),
    "attention": ("prefill_attention", "decode_attention", "write_kv"),
    "rms_norm": ("rms_norm",),
    "rotary": ("rotary",),
    "silu_and_mul": ("silu_and_mul",),
    "embedding": ("embedding",),
}
# Part -> Python functions whose cumulative time it is.
CUMULATIVE_PARTS = {
    "lm_head": ("compute_logits",),
    "sampling": ("__call__@sampling.py",),
    "schedule": ("schedule@",),
    "prepare_inputs": ("prepare_batch",),
    "forward": ("forward@base.py",),
    "step": ("step@llm_engine.py",),
}


def _builtin_name(func: tuple) -> str | None:
    """The bare name of a C function in a pstats key (``('~', 0, '<built-in method x>')``)."""
    filename, _, name = func
    if filename != "~":
        return None
    name = name.strip("<>{}")
    return name.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]


def _matches(func: tuple, pattern: str) -> bool:
    filename, _, name = func
    if "@" not in pattern:
        return name == pattern
    want_name, want_file = pattern.split("@")
    return name == want_name and filename.endswith(want_file)


def breakdown(stats: pstats.Stats, num_steps: int) -> dict[str, float]:
    """Milliseconds per step of each part (see the module docstring)."""
    raw = stats.stats  # type: ignore[attr-defined]
    own = {part: 0.0 for part in NATIVE_PARTS}
    cumulative = {part: 0.0 for part in CUMULATIVE_PARTS}
    for func, (_, _, tottime, cumtime, _) in raw.items():
        name = _builtin_name(func)
        for part, names in NATIVE_PARTS.items():
            if name in names:
                own[part] += tottime
        for part, patterns in CUMULATIVE_PARTS.items():
            if any(_matches(func, p) for p in patterns):
                cumulative[part] = max(cumulative[part], cumtime)
    # The LM head's GEMM runs under compute_logits, outside forward; cProfile keeps one
    # caller level, so it is taken out of the layers' GEMMs as the whole of compute_logits.
    own["gemm"] = max(0.0, own["gemm"] - cumulative["lm_head"])
    parts = dict(own)
    parts["lm_head"] = cumulative["lm_head"]
    parts["sampling"] = cumulative["sampling"]
    parts["schedule"] = cumulative["schedule"]
    parts["prepare_inputs"] = cumulative["prepare_inputs"]
    in_forward = sum(own.values())
    parts["model_overhead"] = max(0.0, cumulative["forward"] - in_forward)
    accounted = sum(parts.values())
    parts["engine_other"] = max(0.0, cumulative["step"] - accounted)
    return {k: 1e3 * v / num_steps for k, v in parts.items()}


def profile_decode(llm: LLM, batch: int, prompt_len: int, num_steps: int, seed: int) -> dict:
    """Steps of `batch` running decodes: plain timing, then one cProfile pass."""
    engine = llm.llm_engine
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=3 * num_steps + 8, ignore_eos=True)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(batch)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"profile-{batch}-{i}", prompt, params)
    t0 = time.perf_counter()
    while engine.scheduler.num_waiting or engine.scheduler.prefilling:
        engine.step()  # the prefill steps
    prefill_s = time.perf_counter() - t0
    for _ in range(3):
        engine.step()  # warm-up
    times = []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(num_steps):
        engine.step()
    profiler.disable()
    for i in range(batch):
        engine.abort_request(f"profile-{batch}-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    parts = breakdown(pstats.Stats(profiler), num_steps)
    profiled = sum(parts.values())
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "num_steps": num_steps,
        "prefill_all_s": prefill_s,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
        "profiled_step_ms": profiled,
        "parts_ms": parts,
        "parts_fraction": {k: v / profiled for k, v in parts.items()},
    }


def print_profile(result: dict) -> None:
    print(
        f"batch {result['batch']:>3}: step {result['step_ms_median']:.2f} ms median "
        f"(profiled {result['profiled_step_ms']:.2f} ms)"
    )
    for part, frac in sorted(result["parts_fraction"].items(), key=lambda kv: -kv[1]):
        print(f"    {part:>15} {100 * frac:5.1f}%  {result['parts_ms'][part]:7.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--policy", default=None, help="engine policy (default: the engine's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="save results here (with provenance)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _native.set_num_threads(args.threads)
    kwargs = {} if args.policy is None else {"policy": args.policy}
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_memory_bytes=1 << 30,
        log_stats_interval_s=0,
        **kwargs,
    )
    results = []
    for batch in args.batch:
        result = profile_decode(llm, batch, args.prompt_len, args.num_steps, seed=batch)
        print_profile(result)
        results.append(result)
    if args.json:
        from distserve_rt.ops.layer_ops import cpu_linear_backend

        payload = {
            "model": args.model,
            "dtype": args.dtype,
            "cpu_linear_backend": cpu_linear_backend(),
            "decode_profiles": results,
        }
        save_result(args.json, payload)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

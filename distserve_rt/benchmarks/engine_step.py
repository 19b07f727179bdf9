"""Engine benchmarks: the CPU cost of a decode step with the model removed, and tokens/s of
the tiny dummy models.

Run: ``OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python -m distserve_rt.benchmarks.engine_step
--threads 2 --json bench/results/engine_cpu.json``

Step cost: `LLMEngine.step` (schedule -> prepare_inputs -> postprocess, stop checks and
lifecycle events included) at a batch of 256 running requests, where the executor runs the
real `ModelRunner.prepare_inputs` and returns tokens without a model or a sampler.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from distserve_rt import _native
from distserve_rt.benchmarks.environment import save_result
from distserve_rt.core.scheduler import SchedulerConfig, SchedulerOutput
from distserve_rt.engine import LLM, EngineConfig, LLMEngine
from distserve_rt.models import get_preset
from distserve_rt.models.config import ModelConfig
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.executor import Executor
from distserve_rt.worker.model_runner import ModelRunner, ModelRunnerOutput

POLICIES = ("continuous_batching", "chunked_prefill")


class NoModelExecutor(Executor):
    """Prepares inputs like the real runner, then returns a fixed token per row."""

    def __init__(self, model_config: ModelConfig, num_blocks: int) -> None:
        self._model_config = model_config
        self._num_blocks = num_blocks
        self._runner: ModelRunner | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        sc = scheduler_config
        # prepare_inputs only reads the pool's device; the model is never called.
        self._runner = ModelRunner(
            None, torch.zeros(1), None, sc.max_num_batched_tokens, sc.max_num_seqs
        )
        return self._num_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        model_input = self._runner.prepare_inputs(scheduler_output)
        return ModelRunnerOutput([7] * len(model_input.sampling_requests))

    def shutdown(self) -> None:
        self._runner = None


def step_cost(policy: str, batch: int = 256, prompt_len: int = 16, num_steps: int = 300) -> dict:
    """Median/mean microseconds of `LLMEngine.step` over `num_steps` decode steps."""
    model_config = get_preset("llama-tiny")
    num_blocks = batch * (-(-(prompt_len + num_steps + 8) // 16)) + 16
    config = EngineConfig(
        policy=policy,
        max_num_seqs=batch,
        max_num_batched_tokens=max(4096, batch * prompt_len),
        max_model_len=4096,
        log_stats_interval_s=0,
        enable_prefix_caching=False,  # comparable with the step costs recorded before it
    )
    engine = LLMEngine(config, executor=NoModelExecutor(model_config, num_blocks))
    params = SamplingParams(temperature=0, max_tokens=num_steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(str(i), [3 + (i + j) % 500 for j in range(prompt_len)], params)
    while engine.scheduler.num_waiting or engine.scheduler.prefilling:
        engine.step()  # the prefill steps
    times = []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert engine.scheduler.num_running == batch
    return {
        "policy": policy,
        "batch": batch,
        "num_steps": num_steps,
        "median_us": statistics.median(times) * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
        "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6,
    }


def tokens_per_second(
    model: str, policy: str, num_prompts: int = 32, prompt_len: int = 128, output_len: int = 64
) -> dict:
    llm = LLM(model, policy=policy, kv_cache_memory_bytes=256 << 20, log_stats_interval_s=0)
    prompts = [
        {"prompt_token_ids": [3 + (7 * i + j) % 500 for j in range(prompt_len)]}
        for i in range(num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "model": model,
        "policy": policy,
        "shape": f"{num_prompts} x {prompt_len} in / {output_len} out",
        "seconds": elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_out + num_prompts * prompt_len) / elapsed,
        "mean_ttft_s": statistics.fmean(o.metrics.ttft for o in outputs),
        "mean_tpot_s": statistics.fmean(o.metrics.tpot for o in outputs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and kernel threads")
    parser.add_argument("--json", default=None, help="save results here (with provenance)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _native.set_num_threads(args.threads)
    steps = [step_cost(p) for p in POLICIES]
    for s in steps:
        print(f"step cost {s['policy']:>20}: median {s['median_us']:.1f} us (batch 256)")
    throughput = [
        tokens_per_second(m, p) for m in ("dummy:llama-tiny", "dummy:opt-tiny") for p in POLICIES
    ]
    for t in throughput:
        print(
            f"{t['model']:>17} {t['policy']:>20}: {t['output_tokens_per_s']:.0f} output tok/s, "
            f"{t['total_tokens_per_s']:.0f} total tok/s ({t['shape']})"
        )
    if args.json:
        # Two OpenMP pools (torch's, ours) spinning on 2 shared cores slow decode steps
        # up to 40x; the wait policy is part of the result (bench/README.md).
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
        payload = {"env": env, "engine_step_cpu_cost": steps, "tiny_model_throughput": throughput}
        save_result(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

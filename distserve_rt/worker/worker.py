"""A worker: one device's model stage, its KV pool and its model runner.

Built in two phases, as the KV pool's size depends on the model: `Worker(...)` loads the
model; `init_kv_cache(scheduler_config)` measures memory, allocates the pool and the runner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distserve_rt import models
from distserve_rt.config import EngineConfig
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.core.scheduler import SchedulerConfig, SchedulerOutput
from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.logger import init_logger
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.interface import CausalLM
from distserve_rt.worker import kv_sizing
from distserve_rt.worker.model_runner import ModelRunner, ModelRunnerOutput, SampleFn
from distserve_rt.worker.sampling import RequestSampler

logger = init_logger(__name__)


class Worker:
    """Owns the model, the KV pool (sized from memory) and the runner of one device.

    Args:
        config: the engine configuration (model, dtype, device, KV sizing).
        model: an already built model (tests pass fakes); loaded from `config.model`
            with `distserve_rt.models.load_model` when None.
        sample: the sampling function; `RequestSampler` (the full `Sampler`) by default.
        allocate_pool: allocates the KV pool from its spec (a KV transport's
            ``allocate_pool``, so that peers can read it); `allocate_kv_pool` when None.
        parallel: this worker's TP/PP position (a `worker.worker_process` rank); one rank
            holding the whole model by default.
        device: overrides `config.device` (each TP/PP rank has its own CUDA device).
        shared_gpu: other processes' instances use this GPU too (disaggregated
            ``share_gpus``): KV sizing counts only this process's memory
            (`kv_sizing.num_gpu_blocks`).
    """

    def __init__(
        self,
        config: EngineConfig,
        model: CausalLM | None = None,
        sample: SampleFn | None = None,
        allocate_pool: Callable[[KVCacheSpec], torch.Tensor] | None = None,
        *,
        parallel: ParallelContext | None = None,
        device: torch.device | None = None,
        shared_gpu: bool = False,
    ) -> None:
        self.config = config
        self.shared_gpu = shared_gpu
        self.parallel = parallel or ParallelContext()
        self.device = device or torch.device(config.device)
        if model is None:
            model = load_model(config, self.device, self.parallel)
        self.model = model
        mc = self.model.config
        self.sample = sample or RequestSampler(
            mc.eos_token_id, mc.vocab_size, self.device, seed=config.seed
        )
        self._allocate_pool = allocate_pool or (lambda spec: allocate_kv_pool(spec, self.device))
        self.kv_pool: torch.Tensor | None = None
        self._runner: ModelRunner | None = None

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def num_kv_blocks(self) -> int:
        return 0 if self.kv_pool is None else self.kv_pool.shape[0]

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("init_kv_cache() must run before the worker executes steps")
        return self._runner

    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        """Sizes and allocates the KV pool for these limits; returns its block count."""
        num_blocks = self.measure_kv_blocks(scheduler_config)
        self.allocate_kv_cache(scheduler_config, num_blocks)
        return num_blocks

    def measure_kv_blocks(self, scheduler_config: SchedulerConfig) -> int:
        """Blocks this worker's memory holds for these limits (TP/PP ranks take the minimum
        over the instance before `allocate_kv_cache`)."""
        sc = scheduler_config
        spec = self._kv_spec(num_blocks=1)
        max_blocks = kv_sizing.max_useful_blocks(sc.max_num_seqs, sc.max_model_len, spec.block_size)
        if self.device.type == "cpu":
            num_blocks = kv_sizing.num_cpu_blocks(
                self.config.kv_cache_memory_bytes, spec.block_bytes, max_blocks
            )
        else:
            # A runner over a one-block pool, only for the profile run (it reads no cache).
            probe = self._make_runner(allocate_kv_pool(spec, self.device), sc)
            num_blocks = kv_sizing.num_gpu_blocks(
                lambda: probe.profile_run(sc.max_num_batched_tokens, sc.max_num_seqs),
                self.config.gpu_memory_utilization,
                spec.block_bytes,
                max_blocks,
                self.device,
                shared=self.shared_gpu,
            )
            del probe
        return num_blocks

    def allocate_kv_cache(self, scheduler_config: SchedulerConfig, num_blocks: int) -> None:
        """Allocates a pool of `num_blocks` blocks (replacing any earlier one) and the runner."""
        sc, spec = scheduler_config, self._kv_spec(num_blocks)
        self.kv_pool = None  # free the old pool before allocating the new one
        self.kv_pool = self._allocate_pool(spec)
        self._runner = self._make_runner(self.kv_pool, sc)
        logger.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB, %s)",
            num_blocks,
            spec.block_size,
            num_blocks * spec.block_bytes / (1 << 20),
            spec.dtype,
        )

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        runner = self.runner
        return runner.execute(runner.prepare_inputs(scheduler_output))

    def _make_runner(self, kv_pool: torch.Tensor, sc: SchedulerConfig) -> ModelRunner:
        # A prefill instance runs a prompt longer than its budget L_m in a batch of its own
        # (`PrefillScheduler`: prompts are never split), up to max_model_len tokens: the
        # host buffers must hold that step too (int arrays: a few MB at a 128k context).
        max_step_tokens = max(sc.max_num_batched_tokens, sc.max_model_len)
        return ModelRunner(self.model, kv_pool, self.sample, max_step_tokens, sc.max_num_seqs)

    def _kv_spec(self, num_blocks: int) -> KVCacheSpec:
        mc = self.model_config
        return KVCacheSpec(
            num_blocks=num_blocks,
            num_layers=self.model.end_layer - self.model.start_layer,
            # TP splits kv heads over ranks (the model checked that TP divides them).
            num_kv_heads=mc.num_kv_heads // self.parallel.tp_size,
            head_dim=mc.head_dim,
            block_size=self.config.block_size,
            dtype=_model_dtype(self.model),
        )


def load_model(
    config: EngineConfig, device: torch.device, parallel: ParallelContext | None = None
) -> CausalLM:
    """`distserve_rt.models.load_model` for this engine's model, dtype, device and rank."""
    model, _ = models.load_model(
        config.model, dtype=config.dtype, device=device, parallel=parallel, seed=config.seed
    )
    return model


def _model_dtype(model: CausalLM) -> torch.dtype:
    """The KV cache takes the dtype of the model's weights."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            if param.is_floating_point():
                return param.dtype
    raise ValueError(f"cannot tell the dtype of {type(model).__name__}: it has no float weights")

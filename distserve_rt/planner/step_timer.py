"""Step timers: how long one prefill batch or one decode step takes on the device at hand.

`StepTimer` is the seam the profiler measures through; `RunnerStepTimer` is the real one,
`profiler` tests use a fake. The real timer runs the runtime's own `ModelRunner` on a real
paged KV pool, one step at a time (no engine loop, no scheduler policy), so a sample is the
pure step cost the engine pays per step: **input preparation** (`ModelRunner.prepare_inputs`:
host buffers, `AttentionMetadata`, host-to-device copies), **the model** (all layers, the KV
writes, paged attention) and **the sampler** (logits of the sampled rows, then the engine's
`RequestSampler` on greedy requests).
Not included: the scheduler's decision and the engine's postprocessing (appending tokens,
stop checks), which run on the host between steps.

KV contents are whatever the pool holds (zeros): attention costs the same for any values,
and nothing reads the sampled tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler import ScheduledPrefill, SchedulerOutput
from distserve_rt.models.interface import CausalLM
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.model_runner import ModelRunner, SampleFn
from distserve_rt.worker.sampling import RequestSampler

STEP_INCLUDES = ("prepare_inputs", "model", "sampler")
"""What a `RunnerStepTimer` sample covers (written into the profile)."""


class StepTimer(Protocol):
    """Measures one step; both methods return milliseconds (median of repeats)."""

    def prefill_ms(self, prompt_lens: Sequence[int]) -> float:
        """A prefill-only step of whole prompts with these lengths (tokens)."""
        ...

    def decode_ms(self, ctx_lens: Sequence[int]) -> float:
        """A decode-only step of ``len(ctx_lens)`` requests whose KV holds ``ctx_lens``
        tokens before the step (each computes one more)."""
        ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunnerStepTimer:
    """Times `ModelRunner` steps of ``model`` over a pool of ``num_blocks`` KV blocks.

    Args:
        model: the (whole) model, on its device.
        num_blocks: KV blocks of the pool; a step's requests must fit it at once.
        block_size: tokens per KV block.
        max_num_batched_tokens, max_num_seqs: the largest step (runner buffer sizes).
        repeats: timed runs per sample (the median is kept), after ``warmup`` untimed ones.
        sample: the runner's sampling function; None = the engine's default
            (`RequestSampler`), run on greedy requests as the benchmarks send.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        repeats: int = 5,
        warmup: int = 1,
        sample: SampleFn | None = None,
    ) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats!r}, {warmup!r}")
        config = model.config
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        device = next(model.parameters()).device
        spec = KVCacheSpec(
            num_blocks=num_blocks,
            num_layers=model.end_layer - model.start_layer,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=block_size,
            dtype=dtype,
        )
        # [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
        self.kv_pool = allocate_kv_pool(spec, device)
        if sample is None:
            sample = RequestSampler(config.eos_token_id, config.vocab_size, device)
        self.runner = ModelRunner(model, self.kv_pool, sample, max_num_batched_tokens, max_num_seqs)
        self.block_manager = BlockManager(num_blocks, block_size, watermark=0.0)
        self.device = device
        self.vocab_size = config.vocab_size
        self.repeats = repeats
        self.warmup = warmup
        self._rng = np.random.default_rng(0)
        self._params = SamplingParams(temperature=0.0, max_tokens=1)

    def prefill_ms(self, prompt_lens: Sequence[int]) -> float:
        requests = self._requests(prompt_lens)
        bm = self.block_manager
        try:
            for r in requests:
                bm.allocate(r.seq_id, r.num_tokens)
                r.num_computed_tokens = r.num_tokens
            prefills = [ScheduledPrefill(r, r.num_tokens, 0, True) for r in requests]
            out = SchedulerOutput(prefills=prefills)
            out.slot_mapping = np.concatenate([bm.slot_mapping(r.seq_id) for r in requests])
            out.num_prefill_tokens = int(sum(prompt_lens))
            return self._time(out)
        finally:
            self._free(requests)

    def decode_ms(self, ctx_lens: Sequence[int]) -> float:
        # Each request holds ctx tokens of KV and its last generated token is the input.
        requests = self._requests([c + 1 for c in ctx_lens])
        bm = self.block_manager
        try:
            for r, ctx in zip(requests, ctx_lens, strict=True):
                bm.allocate(r.seq_id, ctx)
            ids = [r.seq_id for r in requests]
            result = bm.append_slots_batch(ids)
            if result is None:
                raise ValueError(f"decode batch {list(ctx_lens)} does not fit the KV pool")
            out = SchedulerOutput(decodes=requests, slot_mapping=result.slot_mapping)
            out.decode_block_tables = bm.block_tables(ids)
            out.decode_seq_lens = bm.seq_lens(ids)
            return self._time(out)
        finally:
            self._free(requests)

    def _requests(self, num_tokens: Sequence[int]) -> list[Request]:
        if not num_tokens or min(num_tokens) < 1:
            raise ValueError(f"lengths must be a non-empty list of ints >= 1, got {num_tokens!r}")
        return [
            Request(
                f"profile-{i}",
                i,
                self._rng.integers(0, self.vocab_size, n).tolist(),
                self._params,
                0.0,
                n + 1,
            )
            for i, n in enumerate(num_tokens)
        ]

    def _free(self, requests: list[Request]) -> None:
        for r in requests:
            if r.seq_id in self.block_manager:
                self.block_manager.free(r.seq_id)

    def _time(self, out: SchedulerOutput) -> float:
        """Median ms of prepare_inputs + execute (the worker's step) over the repeats."""
        runner, device = self.runner, self.device
        for _ in range(self.warmup):
            runner.execute(runner.prepare_inputs(out))
        samples = []
        for _ in range(self.repeats):
            _sync(device)
            t0 = time.perf_counter()
            runner.execute(runner.prepare_inputs(out))
            # execute() returns host token ids, which already waits for the device; the
            # sync keeps the sample honest if that ever becomes asynchronous.
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

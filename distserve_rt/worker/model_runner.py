"""The model runner: a `SchedulerOutput` in, sampled tokens out.

``prepare_inputs`` turns the scheduler's decisions into the model's inputs (token ids,
positions, `AttentionMetadata`, the rows whose logits are needed), built in preallocated
numpy buffers with one host-to-device copy per array; ``execute`` runs the model, computes
the logits of those rows only, and samples.

Rows of the step (see `layers.attention`): prefill chunks first, then one row per decode.
Logits are needed for the last row of each prefill chunk that completes its prompt
(`ScheduledPrefill.produces_token`), once more for each sequence forked off it (parallel
sampling: they all sample the prompt's last row), and for every decode row. A step's
copy-on-write block pairs are copied before its forward writes any KV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt.core.request import Request
from distserve_rt.core.scheduler import SchedulerOutput
from distserve_rt.layers.attention import AttentionMetadata
from distserve_rt.logprobs import Logprob
from distserve_rt.models.interface import CausalLM
from distserve_rt.ops import copy_blocks
from distserve_rt.worker.sampling import SampledTokens
from distserve_rt.worker.step_batch import StepBatch

# logits float32 [n, vocab_size] (may be overwritten) and the n requests (row order) ->
# their tokens (see `worker.sampling.RequestSampler`).
SampleFn = Callable[[torch.Tensor, list[Request]], SampledTokens]


@dataclass(slots=True)
class ModelInput:
    """One step's tensors on the model's device."""

    input_ids: torch.Tensor
    """int64 [num_tokens]."""
    positions: torch.Tensor
    """int64 [num_tokens]."""
    metadata: AttentionMetadata
    logits_rows: torch.Tensor
    """int64 [num_sampling]: rows whose logits are sampled, in `sampling_requests` order."""
    sampling_requests: list[Request]


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the engine needs back from a step."""

    sampled_token_ids: list[int]
    """One token per request of `SchedulerOutput.sampling_requests()`, same order."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per sampled row: {token id: Logprob}; None when no row asked for logprobs."""
    generator_states: dict[int, bytes] | None = None
    """seq_id -> generator state after this step's draw, of the seeded requests an executor
    was asked to report (`MultiprocExecutor(report_generator_states=True)`: the generators
    live in its sampling worker); None otherwise (in-process requests hold theirs)."""


class ModelRunner:
    """Runs one model stage (the whole model here) over the paged KV pool.

    Args:
        model: a `CausalLM` (last stage: it computes logits).
        kv_pool: ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``.
        sample: the sampling function (see `SampleFn`).
        max_num_batched_tokens, max_num_seqs: sizes of the preallocated host buffers.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_pool: torch.Tensor,
        sample: SampleFn,
        max_num_batched_tokens: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.sample = sample
        self.device = kv_pool.device
        # Pinned on CUDA so the non_blocking copies are truly asynchronous. Reusing them
        # next step is safe: sampling syncs (tokens go to the host) before the next prepare.
        pin = self.device.type == "cuda"
        max_tokens = max(max_num_batched_tokens, max_num_seqs)

        def buffer(n: int, dtype: torch.dtype) -> np.ndarray:
            return torch.zeros(n, dtype=dtype, pin_memory=pin).numpy()

        self._input_ids = buffer(max_tokens, torch.int64)  # [max_tokens]
        self._positions = buffer(max_tokens, torch.int64)  # [max_tokens]
        self._logits_rows = buffer(max_num_seqs, torch.int64)  # [max_num_seqs]
        self._cu_seqlens = buffer(max_num_seqs + 1, torch.int32)  # [max_num_seqs + 1]
        self._prefix_lens = buffer(max_num_seqs, torch.int32)  # [max_num_seqs]
        self._arange = np.arange(max_tokens, dtype=np.int64)  # row indices of a step

    # ---- prepare ----------------------------------------------------------------------

    def prepare_inputs(self, out: SchedulerOutput) -> ModelInput:
        """The step's inputs from the scheduler's decisions (in-process path)."""
        return self.prepare_batch(StepBatch.from_scheduler_output(out), out.sampling_requests())

    def prepare_batch(self, batch: StepBatch, sampling_requests: list | None = None) -> ModelInput:
        """The step's inputs from its arrays alone (a remote worker has no `Request`s:
        ``sampling_requests`` is then None and its sampler works from seq ids)."""
        num_p, num_d = batch.num_prefill_tokens, batch.num_decodes
        num_tokens = num_p + num_d
        if batch.block_copies is not None:
            # Before the forward: a forked sequence's new token goes into the copy, and the
            # shared original must keep the KV its other owners read.
            copy_blocks(self.kv_pool, self.kv_pool, batch.block_copies)
        num_rows = self._fill_prefills(batch)
        if num_d:
            np.subtract(batch.decode_seq_lens, 1, out=self._positions[num_p:num_tokens])
            self._logits_rows[num_rows : num_rows + num_d] = self._arange[num_p:num_tokens]
            num_rows += num_d
        metadata = AttentionMetadata(
            num_prefill_tokens=num_p,
            num_decode_tokens=num_d,
            slot_mapping=self._to_device(batch.slot_mapping),
        )
        if len(batch.prefill_num_new_tokens):
            self._prefill_metadata(batch, metadata)
        if num_d:
            metadata.decode_block_table = self._to_device(batch.decode_block_tables)
            metadata.decode_seq_lens = self._to_device(batch.decode_seq_lens)
            metadata.decode_max_seq_len = int(batch.decode_seq_lens.max())
        self._input_ids[:num_tokens] = batch.input_ids  # pinned on CUDA: an async copy
        return ModelInput(
            input_ids=self._to_device(self._input_ids[:num_tokens]),
            positions=self._to_device(self._positions[:num_tokens]),
            metadata=metadata,
            logits_rows=self._to_device(self._logits_rows[:num_rows]),
            sampling_requests=sampling_requests or [],
        )

    def _fill_prefills(self, batch: StepBatch) -> int:
        """Writes the prefill rows of the host buffers; returns the logits rows so far."""
        pos, cu = self._positions, self._cu_seqlens
        start = num_rows = 0
        cu[0] = 0
        num_prefills = len(batch.prefill_num_new_tokens)
        forks = batch.prefill_num_forks
        chunks = zip(
            batch.prefill_num_new_tokens.tolist(),
            batch.prefill_prefix_lens.tolist(),
            batch.prefill_produces_token.tolist(),
            [0] * num_prefills if forks is None else forks.tolist(),
            strict=True,
        )
        for i, (n, prefix, produces_token, num_forks) in enumerate(chunks):
            end = start + n
            # np.arange, not a slice of _arange: a chunk may start past any fixed bound
            # (context lengths reach 128k).
            pos[start:end] = np.arange(prefix, prefix + n)
            cu[i + 1] = end
            self._prefix_lens[i] = prefix
            if produces_token:
                # The request's row, then one per forked sequence (`sampling_requests` order).
                self._logits_rows[num_rows : num_rows + 1 + num_forks] = end - 1
                num_rows += 1 + num_forks
            start = end
        return num_rows

    def _prefill_metadata(self, batch: StepBatch, metadata: AttentionMetadata) -> None:
        num_prefills = len(batch.prefill_num_new_tokens)
        metadata.prefill_cu_seqlens = self._to_device(self._cu_seqlens[: num_prefills + 1])
        metadata.prefill_max_seqlen = int(batch.prefill_num_new_tokens.max())
        if batch.prefill_block_tables is not None:
            # Only chunks that continue a cached prefix read the cache through a table.
            metadata.prefill_prefix_lens = self._to_device(self._prefix_lens[:num_prefills])
            metadata.prefill_block_table = self._to_device(batch.prefill_block_tables)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor  # shares the host buffer; the step runs before it is reused
        return tensor.to(self.device, non_blocking=True)

    # ---- run --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelRunnerOutput:
        """Runs the model on the step, samples the needed rows; returns the tokens."""
        hidden = self.run_model(model_input)
        if not model_input.sampling_requests:
            return ModelRunnerOutput(sampled_token_ids=[])
        logits = self.compute_logits(model_input, hidden)
        sampled = self.sample(logits, model_input.sampling_requests)
        # .tolist() is the step's one device sync: tokens go to the host scheduler.
        return ModelRunnerOutput(sampled.token_ids.tolist(), sampled.logprobs)

    @torch.inference_mode()
    def run_model(
        self, model_input: ModelInput, intermediate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This stage's forward: ``[num_tokens, hidden_size]`` (``intermediate``: the previous
        stage's output, None on the first stage)."""
        return self.model(
            model_input.input_ids,
            model_input.positions,
            self.kv_pool,
            model_input.metadata,
            intermediate,
        )

    @torch.inference_mode()
    def compute_logits(self, model_input: ModelInput, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage: float32 ``[num_sampling, vocab_size]`` of the sampled rows."""
        return self.model.compute_logits(hidden[model_input.logits_rows])

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """The largest step the scheduler may build, without a KV cache (memory profiling):
        `num_tokens` prefill tokens in `num_seqs` sequences, logits for each."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        lens[: num_tokens % num_seqs] += 1
        cu = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        positions = np.concatenate([np.arange(n) for n in lens])
        metadata = AttentionMetadata(
            num_prefill_tokens=num_tokens,
            num_decode_tokens=0,
            slot_mapping=None,
            prefill_cu_seqlens=self._to_device(cu),
            prefill_max_seqlen=int(lens.max()),
        )
        parallel = getattr(self.model, "parallel", None)  # fakes are one whole-model stage
        first = parallel is None or parallel.is_first_stage
        last = parallel is None or parallel.is_last_stage
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        # A later pipeline stage gets activations instead of ids (their values do not matter).
        intermediate = None
        if not first:
            hidden_size = self.model.config.hidden_size
            intermediate = torch.zeros(
                num_tokens, hidden_size, dtype=self.kv_pool.dtype, device=self.device
            )
        hidden = self.model(
            input_ids if first else None, self._to_device(positions), None, metadata, intermediate
        )
        if last:
            logits = self.model.compute_logits(hidden[self._to_device(cu[1:].astype(np.int64) - 1)])
            del logits

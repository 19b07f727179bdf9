"""The model runner: a `SchedulerOutput` in, sampled tokens out.

``prepare_inputs`` turns the scheduler's decisions into the model's inputs (token ids,
positions, `AttentionMetadata`, the rows whose logits are needed), built in preallocated
numpy buffers with one host-to-device copy per array; ``execute`` runs the model, computes
the logits of those rows only, and samples.

Rows of the step (see `layers.attention`): prefill chunks first, then one row per decode.
Logits are needed for the last row of each prefill chunk that completes its prompt
(`ScheduledPrefill.produces_token`) and for every decode row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt import ops
from distserve_rt.core.request import Request
from distserve_rt.core.scheduler import SchedulerOutput
from distserve_rt.layers.attention import AttentionMetadata
from distserve_rt.models.interface import CausalLM
from distserve_rt.worker.sampling import SampledTokens

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
    block_copies: torch.Tensor | None = None
    """int64 [num_pairs, 2] copy-on-write pairs, copied before the model runs."""


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the engine needs back from a step."""

    sampled_token_ids: list[int]
    """One token per request of `SchedulerOutput.sampling_requests()`, same order."""
    logprobs: list[dict[int, float]] | None = None
    """Per sampled row: {token id: logprob}; None when no row asked for logprobs."""


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
        self._arange = np.arange(max(max_tokens, 1 << 16), dtype=np.int64)

    # ---- prepare ----------------------------------------------------------------------

    def prepare_inputs(self, out: SchedulerOutput) -> ModelInput:
        num_p, num_d = out.num_prefill_tokens, len(out.decodes)
        num_tokens = num_p + num_d
        num_rows = self._fill_prefills(out)
        if num_d:
            ids = self._input_ids
            ids[num_p:num_tokens] = [r.token_ids[-1] for r in out.decodes]
            np.subtract(out.decode_seq_lens, 1, out=self._positions[num_p:num_tokens])
            self._logits_rows[num_rows : num_rows + num_d] = self._arange[num_p:num_tokens]
            num_rows += num_d
        metadata = AttentionMetadata(
            num_prefill_tokens=num_p,
            num_decode_tokens=num_d,
            slot_mapping=self._to_device(out.slot_mapping),
        )
        if out.prefills:
            self._prefill_metadata(out, metadata)
        if num_d:
            metadata.decode_block_table = self._to_device(out.decode_block_tables)
            metadata.decode_seq_lens = self._to_device(out.decode_seq_lens)
            metadata.decode_max_seq_len = int(out.decode_seq_lens.max())
        copies = out.block_copies
        return ModelInput(
            input_ids=self._to_device(self._input_ids[:num_tokens]),
            positions=self._to_device(self._positions[:num_tokens]),
            metadata=metadata,
            logits_rows=self._to_device(self._logits_rows[:num_rows]),
            sampling_requests=out.sampling_requests(),
            block_copies=self._to_device(copies) if len(copies) else None,
        )

    def _fill_prefills(self, out: SchedulerOutput) -> int:
        """Writes the prefill rows of the host buffers; returns the logits rows so far."""
        ids, pos, cu = self._input_ids, self._positions, self._cu_seqlens
        start = num_rows = 0
        cu[0] = 0
        for i, chunk in enumerate(out.prefills):
            n, prefix = chunk.num_new_tokens, chunk.prefix_len
            end = start + n
            ids[start:end] = chunk.request.token_ids[prefix : prefix + n]
            pos[start:end] = self._arange[prefix : prefix + n]
            cu[i + 1] = end
            self._prefix_lens[i] = prefix
            if chunk.produces_token:
                self._logits_rows[num_rows] = end - 1
                num_rows += 1
            start = end
        return num_rows

    def _prefill_metadata(self, out: SchedulerOutput, metadata: AttentionMetadata) -> None:
        num_prefills = len(out.prefills)
        metadata.prefill_cu_seqlens = self._to_device(self._cu_seqlens[: num_prefills + 1])
        metadata.prefill_max_seqlen = max(p.num_new_tokens for p in out.prefills)
        if out.prefill_block_tables is not None:
            # Only chunks that continue a cached prefix read the cache through a table.
            metadata.prefill_prefix_lens = self._to_device(self._prefix_lens[:num_prefills])
            metadata.prefill_block_table = self._to_device(out.prefill_block_tables)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor  # shares the host buffer; the step runs before it is reused
        return tensor.to(self.device, non_blocking=True)

    # ---- run --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelRunnerOutput:
        """Runs the model on the step, samples the needed rows; returns the tokens."""
        if model_input.block_copies is not None:
            ops.copy_blocks(self.kv_pool, self.kv_pool, model_input.block_copies)
        hidden = self.model(
            model_input.input_ids, model_input.positions, self.kv_pool, model_input.metadata
        )
        if not model_input.sampling_requests:
            return ModelRunnerOutput(sampled_token_ids=[])
        logits = self.model.compute_logits(hidden[model_input.logits_rows])
        sampled = self.sample(logits, model_input.sampling_requests)
        # .tolist() is the step's one device sync: tokens go to the host scheduler.
        return ModelRunnerOutput(sampled.token_ids.tolist(), sampled.logprobs)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """The largest step the scheduler may build, without a KV cache (memory profiling):
        `num_tokens` prefill tokens in `num_seqs` sequences, logits for each."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        lens[: num_tokens % num_seqs] += 1
        cu = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        positions = np.concatenate([self._arange[:n] for n in lens])
        metadata = AttentionMetadata(
            num_prefill_tokens=num_tokens,
            num_decode_tokens=0,
            slot_mapping=None,
            prefill_cu_seqlens=self._to_device(cu),
            prefill_max_seqlen=int(lens.max()),
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, self._to_device(positions), None, metadata)
        logits = self.model.compute_logits(hidden[self._to_device(cu[1:].astype(np.int64) - 1)])
        del logits

"""The contract every model implements, so the model runner never looks inside one.

A model object is one pipeline stage of one TP rank (the whole model when PP = TP = 1):

    model = build_model(config, parallel=ParallelContext(...), dtype=..., device=...)
    hidden = model(input_ids, positions, kv_pool, metadata, intermediate)
    logits = model.compute_logits(hidden[last_token_rows])   # last stage only

* ``input_ids``: int64 ``[num_tokens]`` (first stage; None on later stages).
* ``positions``: int64 ``[num_tokens]``, each token's position in its sequence.
* ``kv_pool``: the stage's pool ``[num_blocks, num_local_layers, 2, num_kv_heads_per_rank,
  block_size, head_dim]`` or None (prefill without a cache, e.g. profiling); layer ``i`` of
  the stage uses ``layer_view(kv_pool, i - start_layer)``.
* ``metadata``: `layers.attention.AttentionMetadata`, built once per step.
* ``intermediate``: ``[num_tokens, hidden_size]`` from the previous stage (None on the first).
* returns ``[num_tokens, hidden_size]``: the final-normed hidden states on the last stage,
  the activations to send to the next stage otherwise.
* ``compute_logits``: ``[n, hidden_size] -> [n, vocab_size]`` float32, gathered over TP.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from distserve_rt.layers.attention import AttentionMetadata
from distserve_rt.models.config import ModelConfig


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig
    start_layer: int
    end_layer: int

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_pool: torch.Tensor | None,
        metadata: AttentionMetadata,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

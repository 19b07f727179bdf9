"""What Llama and OPT share: one pipeline stage of one TP rank, run layer by layer over the
stage's KV pool (the `models.interface.CausalLM` contract).

Subclasses build ``self.layers`` (the stage's decoder layers, local index 0..) and define
`embed` (first stage), `final_norm` (last stage), `lm_head_input` and the weight map.
"""

from __future__ import annotations

import torch

from distserve_rt.core.kv_cache import layer_view
from distserve_rt.distributed.parallel_state import ParallelContext, partition_layers
from distserve_rt.layers.attention import AttentionMetadata
from distserve_rt.layers.embedding import ParallelLMHead
from distserve_rt.layers.weight_utils import FullTensor
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.weights import WeightMap


class StagedCausalLM(torch.nn.Module):
    """Base of the model classes; `__call__` is `CausalLM.__call__`."""

    lm_head: ParallelLMHead | None
    layers: torch.nn.ModuleList

    def __init__(self, config: ModelConfig, parallel: ParallelContext) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.start_layer, self.end_layer = partition_layers(config.num_layers, parallel.pp_size)[
            parallel.pp_rank
        ]

    @property
    def num_local_layers(self) -> int:
        return self.end_layer - self.start_layer

    # ---- per-architecture pieces -------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Last stage: the final norm of ``hidden + residual`` (residual None: of hidden)."""
        raise NotImplementedError

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage: hidden ``[n, hidden_size]`` -> the LM head's input (OPT projects)."""
        return hidden

    @classmethod
    def weight_map(
        cls, config: ModelConfig, layer_range: tuple[int, int], is_first: bool, is_last: bool
    ) -> WeightMap:
        raise NotImplementedError

    @staticmethod
    def normalize_weight_name(name: str) -> str:
        return name

    @classmethod
    def split_fused_tensor(
        cls, config: ModelConfig, name: str, tensor: FullTensor
    ) -> dict[str, FullTensor]:
        """A checkpoint tensor (normalised name) as the tensors of the weight map: itself,
        or its parts when the checkpoint fuses what the map keeps apart (Phi-3)."""
        return {name: tensor}

    @staticmethod
    def is_ignored_weight(config: ModelConfig, name: str) -> bool:
        """Checkpoint tensors that are harmless to skip (derived buffers, tied copies)."""
        return False

    def stage_weight_map(self) -> WeightMap:
        p = self.parallel
        return self.weight_map(
            self.config, (self.start_layer, self.end_layer), p.is_first_stage, p.is_last_stage
        )

    # ---- the CausalLM contract ---------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_pool: torch.Tensor | None,
        metadata: AttentionMetadata,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `models.interface`: returns ``[num_tokens, hidden_size]``."""
        self._check_inputs(input_ids, positions, kv_pool, metadata, intermediate)
        first = self.parallel.is_first_stage
        hidden = self.embed(input_ids, positions) if first else intermediate
        # The residual stream travels beside the layer output so that a layer can fold the
        # residual add into its next norm (one pass instead of two); None = already in hidden.
        residual = None
        for i, layer in enumerate(self.layers):
            kv_cache = None if kv_pool is None else layer_view(kv_pool, i)
            hidden, residual = layer(hidden, residual, positions, kv_cache, metadata)
        if self.parallel.is_last_stage:
            return self.final_norm(hidden, residual)
        return hidden if residual is None else hidden + residual  # the stage's activations

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden_size] -> [n, vocab_size]`` float32, gathered over TP (last stage)."""
        if self.lm_head is None:
            raise ValueError(
                f"compute_logits is for the last pipeline stage; this is stage "
                f"{self.parallel.pp_rank} of {self.parallel.pp_size}"
            )
        return self.lm_head.compute_logits(self.lm_head_input(hidden))

    def _check_inputs(self, input_ids, positions, kv_pool, metadata, intermediate) -> None:
        num_tokens = metadata.num_tokens
        if positions.dim() != 1 or positions.shape[0] != num_tokens:
            raise ValueError(
                f"positions must have shape [num_tokens={num_tokens}], got {tuple(positions.shape)}"
            )
        if self.parallel.is_first_stage:
            if input_ids is None or input_ids.shape != positions.shape:
                got = None if input_ids is None else tuple(input_ids.shape)
                raise ValueError(f"the first stage needs input_ids [{num_tokens}], got {got}")
        elif intermediate is None or tuple(intermediate.shape) != (
            num_tokens,
            self.config.hidden_size,
        ):
            got = None if intermediate is None else tuple(intermediate.shape)
            raise ValueError(
                f"stage {self.parallel.pp_rank} needs intermediate [{num_tokens}, "
                f"{self.config.hidden_size}] from the previous stage, got {got}"
            )
        if kv_pool is not None and (
            kv_pool.dim() != 6 or kv_pool.shape[1] != self.num_local_layers
        ):
            raise ValueError(
                f"kv_pool must be [num_blocks, {self.num_local_layers} (this stage's layers), 2, "
                f"num_kv_heads, block_size, head_dim], got {tuple(kv_pool.shape)}"
            )

"""OPT (the DistServe paper's models): learned positions with OPT's offset of 2, pre-LayerNorm
decoder layers, ReLU FFN, biases, a tied LM head and, when ``word_embed_proj_dim`` differs
from ``hidden_size``, the project_in/project_out projections around the decoder.

Post-LayerNorm OPT (``do_layer_norm_before=False``, only opt-350m) is not implemented.
Checkpoints name tensors ``model.decoder.*`` (OPTForCausalLM) or ``decoder.*`` (the
facebook/opt-* uploads, saved from OPTModel); both load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.layers.activation import ReLU
from distserve_rt.layers.attention import AttentionMetadata, PagedAttention
from distserve_rt.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve_rt.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from distserve_rt.layers.norm import LayerNorm
from distserve_rt.layers.weight_utils import default_weight_loader
from distserve_rt.models.base import StagedCausalLM
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.weights import WeightMap, WeightTarget, add_layer_entries

POSITION_OFFSET = 2
"""OPT's learned position table has 2 extra leading rows (a fairseq padding legacy):
position p uses row p + 2."""


class OPTAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(
            bias=config.enable_bias, parallel=parallel, dtype=dtype, device=device
        )
        h = config.hidden_size
        self.qkv_proj = QKVParallelLinear(
            h, config.head_dim, config.num_heads, config.num_heads, **kw
        )
        self.out_proj = RowParallelLinear(h, h, **kw)
        self.scaling = config.head_dim**-0.5
        heads = self.qkv_proj.num_heads
        # q is scaled before attention as HF does, so the kernel's own scale is 1.
        self.attn = PagedAttention(heads, heads, config.head_dim, 1.0)

    def forward(self, hidden, kv_cache, metadata: AttentionMetadata):
        """``[num_tokens, hidden_size] -> [num_tokens, hidden_size]``."""
        qkv = self.qkv_proj(hidden)  # [num_tokens, 3 * heads_per_rank * head_dim]
        size, head_dim = self.qkv_proj.q_size, self.attn.head_dim
        q, k, v = qkv.split([size, size, size], dim=-1)
        q = (q * self.scaling).view(-1, self.attn.num_heads, head_dim)
        k = k.view(-1, self.attn.num_kv_heads, head_dim)
        v = v.view(-1, self.attn.num_kv_heads, head_dim)
        out = self.attn(q, k, v, kv_cache, metadata)
        return self.out_proj(out.view(-1, size))


class OPTDecoderLayer(torch.nn.Module):
    """Pre-LayerNorm: ``h + attn(ln(h))``, then ``h + fc2(relu(fc1(ln(h))))``."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(
            bias=config.enable_bias, parallel=parallel, dtype=dtype, device=device
        )
        h, eps = config.hidden_size, config.norm_eps
        self.self_attn_layer_norm = LayerNorm(h, eps, dtype=dtype, device=device)
        self.self_attn = OPTAttention(config, parallel, dtype, device)
        self.final_layer_norm = LayerNorm(h, eps, dtype=dtype, device=device)
        self.fc1 = ColumnParallelLinear(h, config.intermediate_size, **kw)
        self.fc2 = RowParallelLinear(config.intermediate_size, h, **kw)
        self.act = ReLU()

    def forward(self, hidden, residual, positions, kv_cache, metadata):
        """``(hidden, None) -> (hidden, None)``: OPT adds its residuals itself."""
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), kv_cache, metadata)
        return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden)))), None


class OPTForCausalLM(StagedCausalLM):
    """An OPT pipeline stage: token + position embeddings (and project_in) on the first
    stage; the final LayerNorm and the LM head (after project_out) on the last."""

    def __init__(
        self, config: ModelConfig, parallel: ParallelContext, dtype: torch.dtype, device: Any
    ) -> None:
        if not config.do_layer_norm_before:
            raise NotImplementedError(
                f"{config.name or 'this OPT model'} uses post-LayerNorm (do_layer_norm_before="
                "False, as opt-350m); only pre-LayerNorm OPT models are implemented"
            )
        super().__init__(config, parallel)
        kw: dict[str, Any] = dict(parallel=parallel, dtype=dtype, device=device)
        h, embed_dim = config.hidden_size, _embed_dim(config)
        self.embed_tokens = self.embed_positions = self.project_in = None
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim, **kw)
            positions = torch.empty(
                config.max_position_embeddings + POSITION_OFFSET, h, dtype=dtype, device=device
            )
            self.embed_positions = torch.nn.Parameter(positions, requires_grad=False)
            self.embed_positions.weight_loader = default_weight_loader
            self.embed_positions.shard_ids = (None,)
            if embed_dim != h:
                self.project_in = ReplicatedLinear(embed_dim, h, bias=False, **kw)
        self.layers = torch.nn.ModuleList(
            OPTDecoderLayer(config, parallel, dtype, device) for _ in range(self.num_local_layers)
        )
        self.final_layer_norm = self.project_out = self.lm_head = None
        if parallel.is_last_stage:
            self.final_layer_norm = LayerNorm(h, config.norm_eps, dtype=dtype, device=device)
            if embed_dim != h:
                self.project_out = ReplicatedLinear(h, embed_dim, bias=False, **kw)
            tied = (
                self.embed_tokens.weight
                if config.tie_word_embeddings and self.embed_tokens
                else None
            )
            self.lm_head = ParallelLMHead(config.vocab_size, embed_dim, shared_weight=tied, **kw)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        return hidden + F.embedding(positions + POSITION_OFFSET, self.embed_positions)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.final_layer_norm(hidden)

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.project_out is None else self.project_out(hidden)

    @staticmethod
    def normalize_weight_name(name: str) -> str:
        return "model." + name if name.startswith("decoder.") else name

    @staticmethod
    def is_ignored_weight(config: ModelConfig, name: str) -> bool:
        return config.tie_word_embeddings and name == "lm_head.weight"

    @classmethod
    def weight_map(
        cls, config: ModelConfig, layer_range: tuple[int, int], is_first: bool, is_last: bool
    ) -> WeightMap:
        h, v, embed_dim = config.hidden_size, config.vocab_size, _embed_dim(config)
        pre = "model.decoder."
        weight_map: WeightMap = {}
        if is_first:
            weight_map[pre + "embed_tokens.weight"] = WeightTarget(
                "embed_tokens.weight", None, (v, embed_dim)
            )
            num_positions = config.max_position_embeddings + POSITION_OFFSET
            weight_map[pre + "embed_positions.weight"] = WeightTarget(
                "embed_positions", None, (num_positions, h)
            )
            if embed_dim != h:
                weight_map[pre + "project_in.weight"] = WeightTarget(
                    "project_in.weight", None, (h, embed_dim)
                )
        add_layer_entries(weight_map, layer_range, pre + "layers.", _layer_entries(config))
        if is_last:
            for suffix in ("weight", "bias"):
                name = f"final_layer_norm.{suffix}"
                weight_map[pre + name] = WeightTarget(name, None, (h,))
            if embed_dim != h:
                weight_map[pre + "project_out.weight"] = WeightTarget(
                    "project_out.weight", None, (embed_dim, h)
                )
            if not config.tie_word_embeddings:
                weight_map["lm_head.weight"] = WeightTarget("lm_head.weight", None, (v, embed_dim))
            elif not is_first:  # the last stage holds its own copy of the tied embedding
                weight_map[pre + "embed_tokens.weight"] = WeightTarget(
                    "lm_head.weight", None, (v, embed_dim)
                )
        return weight_map


def _embed_dim(config: ModelConfig) -> int:
    return config.word_embed_proj_dim or config.hidden_size


def _layer_entries(config: ModelConfig) -> list[tuple[str, str, Any, tuple[int, ...]]]:
    """(hf_suffix, our_suffix, shard_id, full shape) of one decoder layer."""
    h, f = config.hidden_size, config.intermediate_size
    linears = [
        ("self_attn.q_proj", "self_attn.qkv_proj", "q", (h, h)),
        ("self_attn.k_proj", "self_attn.qkv_proj", "k", (h, h)),
        ("self_attn.v_proj", "self_attn.qkv_proj", "v", (h, h)),
        ("self_attn.out_proj", "self_attn.out_proj", None, (h, h)),
        ("fc1", "fc1", None, (f, h)),
        ("fc2", "fc2", None, (h, f)),
    ]
    entries = []
    for hf, ours, shard, shape in linears:
        entries.append((f"{hf}.weight", f"{ours}.weight", shard, shape))
        if config.enable_bias:
            entries.append((f"{hf}.bias", f"{ours}.bias", shard, (shape[0],)))
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        for suffix in ("weight", "bias"):
            entries.append((f"{norm}.{suffix}", f"{norm}.{suffix}", None, (h,)))
    return entries

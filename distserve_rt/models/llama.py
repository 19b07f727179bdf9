"""Llama family (Llama-2/3, Mistral-shaped, Qwen2/2.5 and Phi-3 checkpoints): GQA attention
with RoPE (and Llama-3.1 rope scaling), RMSNorm, SwiGLU MLP, tied or untied embeddings,
optional biases (Qwen2: on q/k/v only, `ModelConfig.qkv_bias`). Qwen3 (`models.qwen3`) and
Gemma (`models.gemma`) subclass it through the hooks `LlamaAttention.normalize_qk`,
`LlamaForCausalLM.embed` and `layer_entries`, and the classes they build
(``attention_cls``, ``mlp_cls``, ``act_cls``, ``norm_cls``, ``decoder_layer_cls``).

One object is one pipeline stage of one TP rank (`models.base.StagedCausalLM`). HF names
``model.layers.N.self_attn.{q,k,v}_proj`` load into the fused ``qkv_proj``,
``mlp.{gate,up}_proj`` into ``gate_up_proj``.
"""

from __future__ import annotations

from typing import Any

import torch

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.layers.activation import SiluAndMul
from distserve_rt.layers.attention import AttentionMetadata, PagedAttention
from distserve_rt.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve_rt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from distserve_rt.layers.norm import RMSNorm
from distserve_rt.layers.rotary import RotaryEmbedding
from distserve_rt.models.base import StagedCausalLM
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.weights import WeightMap, WeightTarget, add_layer_entries


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(parallel=parallel, dtype=dtype, device=device)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.qkv_bias,
            **kw,
        )
        self.o_proj = RowParallelLinear(
            config.q_size, config.hidden_size, bias=config.attention_bias, **kw
        )
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, device=device
        )
        qkv = self.qkv_proj
        self.attn = PagedAttention(
            qkv.num_heads, qkv.num_kv_heads, config.head_dim, config.head_dim**-0.5
        )

    def forward(self, hidden, positions, kv_cache, metadata: AttentionMetadata):
        """``[num_tokens, hidden_size] -> [num_tokens, hidden_size]``."""
        qkv = self.qkv_proj(hidden)  # [num_tokens, (heads + 2 * kv_heads) * head_dim] per rank
        q_size, kv_size, head_dim = self.qkv_proj.q_size, self.qkv_proj.kv_size, self.attn.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.attn.num_heads, head_dim)
        k = k.view(-1, self.attn.num_kv_heads, head_dim)
        v = v.view(-1, self.attn.num_kv_heads, head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, metadata)
        return self.o_proj(out.view(-1, q_size))

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor):
        """Hook before RoPE on ``q [num_tokens, heads, head_dim]``, ``k [.., kv_heads, ..]``
        (Qwen3 normalises each head); Llama uses them as projected."""
        return q, k


class LlamaMLP(torch.nn.Module):
    act_cls: type[torch.nn.Module] = SiluAndMul
    """``[n, 2 * ffn] (gate | up) -> [n, ffn]`` (Gemma: GELU instead of SiLU)."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(
            bias=config.mlp_bias, parallel=parallel, dtype=dtype, device=device
        )
        ffn = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, (ffn, ffn), **kw)
        self.down_proj = RowParallelLinear(ffn, config.hidden_size, **kw)
        self.act = self.act_cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(torch.nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention
    mlp_cls: type[LlamaMLP] = LlamaMLP
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device) -> None:
        super().__init__()
        norm: dict[str, Any] = dict(dtype=dtype, device=device)
        self.input_layernorm = self.norm_cls(config.hidden_size, config.norm_eps, **norm)
        self.self_attn = self.attention_cls(config, parallel, dtype, device)
        self.post_attention_layernorm = self.norm_cls(config.hidden_size, config.norm_eps, **norm)
        self.mlp = self.mlp_cls(config, parallel, dtype, device)

    def forward(self, hidden, residual, positions, kv_cache, metadata):
        """``(hidden, residual) -> (mlp output, residual stream before it)``: each residual
        add is fused into the norm after it (the last one into the next layer's, or the
        final norm); HF's ``h + attn(norm(h))`` with the same bf16 rounding."""
        if residual is None:  # the stage's first layer; a copy: the norms update it in place
            residual, hidden = hidden.clone(), self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(StagedCausalLM):
    """A Llama pipeline stage: embeds on the first stage, applies the final RMSNorm and
    owns the LM head on the last."""

    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(
        self, config: ModelConfig, parallel: ParallelContext, dtype: torch.dtype, device: Any
    ) -> None:
        super().__init__(config, parallel)
        kw: dict[str, Any] = dict(parallel=parallel, dtype=dtype, device=device)
        self.embed_tokens = None
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = torch.nn.ModuleList(
            self.decoder_layer_cls(config, parallel, dtype, device)
            for _ in range(self.num_local_layers)
        )
        self.norm = self.lm_head = None
        if parallel.is_last_stage:
            norm_cls = self.decoder_layer_cls.norm_cls
            self.norm = norm_cls(config.hidden_size, config.norm_eps, dtype=dtype, device=device)
            tied = (
                self.embed_tokens.weight
                if config.tie_word_embeddings and self.embed_tokens
                else None
            )
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, shared_weight=tied, **kw
            )

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]

    @staticmethod
    def is_ignored_weight(config: ModelConfig, name: str) -> bool:
        # inv_freq: a buffer old checkpoints saved; lm_head: a copy of the tied embedding.
        return name.endswith("rotary_emb.inv_freq") or (
            config.tie_word_embeddings and name == "lm_head.weight"
        )

    @classmethod
    def weight_map(
        cls, config: ModelConfig, layer_range: tuple[int, int], is_first: bool, is_last: bool
    ) -> WeightMap:
        h, v = config.hidden_size, config.vocab_size
        weight_map: WeightMap = {}
        if is_first:
            weight_map["model.embed_tokens.weight"] = WeightTarget(
                "embed_tokens.weight", None, (v, h)
            )
        add_layer_entries(weight_map, layer_range, "model.layers.", cls.layer_entries(config))
        if is_last:
            weight_map["model.norm.weight"] = WeightTarget("norm.weight", None, (h,))
            if not config.tie_word_embeddings:
                weight_map["lm_head.weight"] = WeightTarget("lm_head.weight", None, (v, h))
            elif not is_first:  # the last stage holds its own copy of the tied embedding
                weight_map["model.embed_tokens.weight"] = WeightTarget(
                    "lm_head.weight", None, (v, h)
                )
        return weight_map

    @classmethod
    def layer_entries(cls, config: ModelConfig) -> list[tuple[str, str, Any, tuple[int, ...]]]:
        """(hf_suffix, our_suffix, shard_id, full shape) of one decoder layer."""
        return _layer_entries(config)


def _layer_entries(config: ModelConfig) -> list[tuple[str, str, Any, tuple[int, ...]]]:
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    qkv = [
        ("self_attn.q_proj", "self_attn.qkv_proj", "q", q),
        ("self_attn.k_proj", "self_attn.qkv_proj", "k", kv),
        ("self_attn.v_proj", "self_attn.qkv_proj", "v", kv),
    ]
    o_proj = [("self_attn.o_proj", "self_attn.o_proj", None, h)]
    mlp = [
        ("mlp.gate_proj", "mlp.gate_up_proj", 0, f),
        ("mlp.up_proj", "mlp.gate_up_proj", 1, f),
        ("mlp.down_proj", "mlp.down_proj", None, h),
    ]
    in_features = {"self_attn.o_proj": q, "mlp.down_proj": f}
    entries = []
    groups = ((qkv, config.qkv_bias), (o_proj, config.attention_bias), (mlp, config.mlp_bias))
    for group, has_bias in groups:
        for hf, ours, shard, out in group:
            entries.append((f"{hf}.weight", f"{ours}.weight", shard, (out, in_features.get(hf, h))))
            if has_bias:
                entries.append((f"{hf}.bias", f"{ours}.bias", shard, (out,)))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        entries.append((f"{norm}.weight", f"{norm}.weight", None, (h,)))
    return entries

"""Phi-3 / Phi-4 (``Phi3ForCausalLM``): Llama's architecture with q/k/v fused into one
checkpoint tensor (``self_attn.qkv_proj``, rows q | k | v) and gate/up into another
(``mlp.gate_up_proj``, rows gate | up). The fused tensors are split on load into the names
`LlamaForCausalLM`'s weight map already has, so each TP rank still reads only its rows.

Long-context variants (``longrope`` RoPE), RoPE on part of the head
(``partial_rotary_factor``, Phi-4-mini) and sliding-window attention (Phi-3-*-4k) are
refused by `ModelConfig.from_hf_config` and `layers.rotary`.
"""

from __future__ import annotations

from distserve_rt.layers.weight_utils import FullTensor
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.llama import LlamaForCausalLM
from distserve_rt.models.weights import split_rows


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def split_fused_tensor(
        cls, config: ModelConfig, name: str, tensor: FullTensor
    ) -> dict[str, FullTensor]:
        prefix, dot, suffix = name.rpartition(".")
        if suffix != "weight":
            return {name: tensor}
        if prefix.endswith("self_attn.qkv_proj"):
            base = prefix.removesuffix("qkv_proj")
            parts = [("q_proj", config.q_size), ("k_proj", config.kv_size)]
            parts.append(("v_proj", config.kv_size))
        elif prefix.endswith("mlp.gate_up_proj"):
            base = prefix.removesuffix("gate_up_proj")
            f = config.intermediate_size
            parts = [("gate_proj", f), ("up_proj", f)]
        else:
            return {name: tensor}
        return split_rows(name, tensor, [(f"{base}{part}{dot}weight", n) for part, n in parts])

"""Architecture shape of a causal LM: what the model code, the KV pool and the planner need.

One dataclass for every family we run (Llama/Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma, OPT). It is
built from a Hugging Face ``config.json`` (`ModelConfig.from_hf_config`) or taken from a
preset (`models/presets.py`), so the planner reasons about OPT-175B with the same numbers
the runtime would load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "opt")
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "phi3", "gemma")
"""Families built from Llama's layers (RMSNorm, RoPE, gated MLP, GQA): the same config keys."""

# HF `architectures[0]` / `model_type` -> our family name.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "OPTForCausalLM": "opt",
}
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "opt": "opt",
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and hyper-parameters of one model (all counts are for the whole model, TP=1)."""

    architecture: str
    """"llama" (RMSNorm, RoPE, SwiGLU, GQA), "qwen2" (Llama with q/k/v biases), "qwen3"
    (Llama with a per-head RMSNorm on q and k), "phi3" (Llama with fused checkpoint tensors),
    "gemma" (Llama with GELU, ``1 + weight`` norms and scaled embeddings) or "opt"
    (LayerNorm, learned positions, ReLU)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """FFN inner width (OPT's ``ffn_dim``)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    """RMSNorm eps (Llama) or LayerNorm eps (OPT)."""
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()
    """Further ids that end a turn (Llama-3.1-Instruct lists 128001, 128008 and 128009):
    the engine stops on them as on eos_token_id unless ignore_eos."""
    # Llama-like (LLAMA_LIKE) only.
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    """HF ``rope_scaling`` dict, e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``."""
    attention_bias: bool = False
    """Biases on q/k/v and o_proj (Llama's and Qwen3's ``attention_bias``)."""
    mlp_bias: bool = False
    # OPT only.
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    """OPT-350m projects embeddings to/from a smaller width; None means hidden_size."""
    enable_bias: bool = True
    name: str = ""
    """Preset name or model path, for messages and reports."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    # ---- sizes the KV pool and the planner use ----------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections have biases: Qwen2 always (its o_proj has none, so this is not
        attention_bias), the others with attention_bias."""
        return self.attention_bias or self.architecture == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each head of q and k (weights ``[head_dim]``) before RoPE."""
        return self.architecture == "qwen3"

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache bytes one token takes over all layers (K and V)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.architecture in LLAMA_LIKE:
            mlp = 3 * h * f
            norms = 2 * h + 2 * self.head_dim * self.qk_norm
            bias = (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.attention_bias
            bias += (2 * f + h) * self.mlp_bias
            final = h
            positions = 0
        else:
            mlp = 2 * h * f
            norms = 4 * h  # two LayerNorms with weight and bias
            bias = (self.q_size + 2 * self.kv_size + h + f + h) * self.enable_bias
            final = 2 * h
            positions = (self.max_position_embeddings + 2) * h  # OPT's offset of 2
        per_layer = attn + mlp + norms + bias
        embed = v * h
        lm_head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * per_layer + embed + lm_head + final + positions

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.num_params() * dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from a parsed HF ``config.json``; unknown architectures raise ValueError."""
        arch = _family(hf)
        _check_activation(hf, arch)
        eos = hf.get("eos_token_id")
        extra_eos: tuple[int, ...] = ()
        if isinstance(eos, list):  # Llama-3 instruct lists several: all of them end a turn
            eos, extra_eos = (eos[0], tuple(eos[1:])) if eos else (None, ())
        common = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            # transformers' defaults: OPT and Gemma tie, the others do not.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch in ("opt", "gemma"))),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            extra_eos_token_ids=extra_eos,
            pad_token_id=hf.get("pad_token_id"),
            name=name,
        )
        window = _sliding_window(hf)
        if window is not None and window < common["max_position_embeddings"]:
            # Mistral-7B-v0.1: attention past the window would silently differ from the model.
            raise ValueError(
                f"sliding_window={window} (< max_position_embeddings "
                f"{common['max_position_embeddings']}): sliding-window attention is not supported"
            )
        try:
            if arch in LLAMA_LIKE:
                num_heads = hf["num_attention_heads"]
                # Qwen3Config's and GemmaConfig's head_dim defaults ignore hidden_size / heads.
                default_head_dim = {"qwen3": 128, "gemma": 256}.get(
                    arch, hf["hidden_size"] // num_heads
                )
                return cls(
                    **common,
                    intermediate_size=hf["intermediate_size"],
                    num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                    head_dim=hf.get("head_dim") or default_head_dim,
                    norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=_rope_theta(hf),
                    rope_scaling=_rope_scaling(hf),
                    # Qwen2's q/k/v biases are implied by the architecture (`qkv_bias`); a
                    # stray attention_bias key would wrongly add one to its o_proj. Phi-3's
                    # projections never have biases.
                    attention_bias=arch not in ("qwen2", "phi3")
                    and bool(hf.get("attention_bias", False)),
                    mlp_bias=bool(hf.get("mlp_bias", False)),
                )
            return cls(
                **common,
                intermediate_size=hf["ffn_dim"],
                num_kv_heads=hf["num_attention_heads"],
                head_dim=hf["hidden_size"] // hf["num_attention_heads"],
                norm_eps=1e-5,
                do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
                word_embed_proj_dim=hf.get("word_embed_proj_dim"),
                enable_bias=bool(hf.get("enable_bias", True)),
            )
        except KeyError as exc:
            what = name or "the model"
            raise ValueError(f"config.json of {what} lacks {exc.args[0]!r}") from None


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 writes rope_theta inside "rope_parameters"; older files at top level.
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling dict (``rope_scaling``, or transformers 5's ``rope_parameters`` without
    its theta); None for plain RoPE."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return None if rope_type == "default" else scaling


_ACTIVATIONS = {
    "llama": ("hidden_act", ("silu",)),
    "qwen2": ("hidden_act", ("silu",)),
    "qwen3": ("hidden_act", ("silu",)),
    "phi3": ("hidden_act", ("silu",)),
    # Gemma 1.0 files say "gelu", which transformers runs as the tanh approximation.
    "gemma": ("hidden_act", ("gelu_pytorch_tanh", "gelu")),
    "opt": ("activation_function", ("relu",)),
}


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """The window of the layers that attend within one, as transformers decides it; None
    when every layer attends to the whole context. Qwen2/Qwen3 configs carry a
    ``sliding_window`` that is off unless ``use_sliding_window``, and then only for the
    layers from ``max_window_layers`` on (``layer_types`` lists them in newer files)."""
    window = hf.get("sliding_window")
    if window is None or hf.get("use_sliding_window", True) is False:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    first_sliding = hf.get("max_window_layers", 0)
    return window if first_sliding < hf.get("num_hidden_layers", first_sliding + 1) else None


def _check_activation(hf: dict[str, Any], arch: str) -> None:
    """Refuses what our layers would silently compute differently: activations other than
    Llama's SwiGLU, Gemma's GeGLU and OPT's ReLU, partial RoPE, bidirectional attention,
    OPT variants without the final norm."""
    key, allowed = _ACTIVATIONS[arch]
    value = hf.get(key, allowed[0])
    if value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"config.json has {key}={value!r}; only {choices} is supported for {arch}")
    if arch == "gemma" and hf.get("use_bidirectional_attention"):
        raise ValueError(
            "config.json has use_bidirectional_attention=True; only causal is supported"
        )
    params = hf.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if arch in LLAMA_LIKE and partial != 1.0:
        # Phi-4-mini rotates 3/4 of each head; RoPE on the whole head would differ.
        raise ValueError(
            f"config.json has partial_rotary_factor={partial}; only 1.0 (RoPE on the whole "
            "head) is supported"
        )
    if arch == "opt" and hf.get("_remove_final_layer_norm", False):
        raise ValueError("OPT checkpoints with _remove_final_layer_norm=True are not supported")
    if arch == "opt" and not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")


def _family(hf: dict[str, Any]) -> str:
    for arch in hf.get("architectures") or ():
        if arch in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    if hf.get("auto_map"):
        # trust_remote_code is accepted for vLLM's sake, but its code is never imported: an
        # architecture only that code defines cannot be served.
        code = sorted(map(str, hf["auto_map"].values()))
        raise ValueError(
            f"architecture {hf.get('architectures')!r} needs the checkpoint's custom code "
            f"(auto_map {code}), which distserve_rt never runs, "
            f"with or without trust_remote_code; supported: {sorted(_HF_ARCHITECTURES)}"
        )
    raise ValueError(
        f"unsupported architecture {hf.get('architectures')!r} (model_type {model_type!r}); "
        f"supported: {sorted(_HF_ARCHITECTURES)}"
    )

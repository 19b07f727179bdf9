"""Architecture name -> model class, and `build_model` (empty weights, real shapes)."""

from __future__ import annotations

from typing import Any

import torch

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.models.base import StagedCausalLM
from distserve_rt.models.config import ARCHITECTURES, ModelConfig
from distserve_rt.models.gemma import GemmaForCausalLM
from distserve_rt.models.llama import LlamaForCausalLM
from distserve_rt.models.opt import OPTForCausalLM
from distserve_rt.models.phi3 import Phi3ForCausalLM
from distserve_rt.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[StagedCausalLM]] = {
    "llama": LlamaForCausalLM,
    # Qwen2/2.5 is Llama with q/k/v biases, which LlamaForCausalLM takes from the config.
    "qwen2": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "opt": OPTForCausalLM,
}
assert set(MODEL_CLASSES) == set(ARCHITECTURES), "every ModelConfig architecture has a class"


def model_class(config: ModelConfig) -> type[StagedCausalLM]:
    return MODEL_CLASSES[config.architecture]


def build_model(
    config: ModelConfig,
    parallel: ParallelContext | None = None,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
) -> StagedCausalLM:
    """The stage of `parallel` (default: the whole model on one rank) with uninitialised
    weights of `dtype` on `device` ("meta" allocates nothing: shapes and counts only).
    Load weights with `models.loader`. Raises ValueError when TP does not divide the
    heads, the FFN width or the embeddings, or PP exceeds the layer count."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    parallel = parallel or ParallelContext()
    with torch.device(device):  # buffers created without an explicit device land there too
        model = model_class(config)(config, parallel, dtype, device)
    return model.eval()

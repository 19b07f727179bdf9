"""Model architectures (Llama/Mistral, Qwen2/2.5/3, Phi-3, Gemma, OPT), their shapes and
presets, and weight loading.

`ModelConfig` and the presets are plain data; the model classes and the loader need torch
and load on first use, so the planner (shapes only) never imports torch.
"""

from __future__ import annotations

import importlib

from distserve_rt.models.config import ModelConfig
from distserve_rt.models.presets import PRESETS, get_preset

_LAZY = {
    "CausalLM": "distserve_rt.models.interface",
    "load_model": "distserve_rt.models.loader",
    "build_model": "distserve_rt.models.registry",
}

__all__ = ["PRESETS", "CausalLM", "ModelConfig", "build_model", "get_preset", "load_model"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'distserve_rt.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

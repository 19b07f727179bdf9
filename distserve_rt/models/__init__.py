"""Model architectures (Llama, OPT), their shapes and presets, and weight loading."""

from distserve_rt.models.config import ModelConfig
from distserve_rt.models.interface import CausalLM
from distserve_rt.models.loader import load_model
from distserve_rt.models.presets import PRESETS, get_preset
from distserve_rt.models.registry import build_model

__all__ = ["PRESETS", "CausalLM", "ModelConfig", "build_model", "get_preset", "load_model"]

"""Model architectures (Llama, OPT), their shapes and presets, and weight loading."""

from distserve_rt.models.config import ModelConfig
from distserve_rt.models.presets import PRESETS, get_preset

__all__ = ["PRESETS", "ModelConfig", "get_preset"]

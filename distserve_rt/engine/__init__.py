"""Engines: the colocated `LLMEngine`, its config, and the offline `LLM` API."""

from distserve_rt.engine.config import EngineConfig
from distserve_rt.engine.llm import LLM
from distserve_rt.engine.llm_engine import LLMEngine

__all__ = ["LLM", "EngineConfig", "LLMEngine"]

"""Engines: the colocated `LLMEngine` and the offline `LLM` API (`EngineConfig` lives in
`distserve_rt.config`; it is re-exported here for ``from distserve_rt.engine import ...``)."""

from distserve_rt.config import EngineConfig
from distserve_rt.engine.llm import LLM
from distserve_rt.engine.llm_engine import LLMEngine

__all__ = ["LLM", "EngineConfig", "LLMEngine"]

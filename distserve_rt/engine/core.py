"""Builds the `EngineCore` of a placement: the colocated `LLMEngine`, its data-parallel
replicas (`DataParallelCore`) or the disaggregated `Controller`, each given the model's
tokenizer at construction."""

from __future__ import annotations

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.models.config import ModelConfig
from distserve_rt.tokenizer import Tokenizer, get_tokenizer
from distserve_rt.worker.multiproc_executor import load_model_config


def make_engine_core(
    config: EngineConfig,
    placement: Placement | str | None = None,
    disagg_config: DisaggConfig | None = None,
) -> EngineCore:
    """The engine of `placement` (colocated by default; see `Placement.parse`). A colocated
    placement's replicas (a placement file's TP x PP and count) set `config`'s parallel
    sizes (`Placement.apply_to`: ValueError when they contradict it)."""
    placement = Placement.parse(placement)
    config = placement.apply_to(config)
    tokenizer = load_tokenizer(config, load_model_config(config.model))
    if config.data_parallel_size > 1:
        from distserve_rt.engine.data_parallel import DataParallelCore  # spawns processes

        return DataParallelCore(config, disagg_config, tokenizer=tokenizer)
    if not placement.is_disaggregated:
        return LLMEngine(config, tokenizer=tokenizer)
    from distserve_rt.engine.controller import Controller  # spawns processes: only when asked

    return Controller(config, placement, disagg_config, tokenizer=tokenizer)


def load_tokenizer(config: EngineConfig, model_config: ModelConfig) -> Tokenizer:
    """The model's tokenizer (``tokenizer.json`` of an HF directory, bytes for dummy:)."""
    return get_tokenizer(config.model, model_config)

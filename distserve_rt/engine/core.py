"""Builds the `EngineCore` of a placement: the colocated `LLMEngine`, its data-parallel
replicas (`DataParallelCore`) or the disaggregated `Controller`, each given the model's
tokenizer at construction."""

from __future__ import annotations

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.logger import init_logger
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.hf_cache import resolve_model_path
from distserve_rt.models.loader import DUMMY_PREFIX
from distserve_rt.tokenizer import Tokenizer, get_tokenizer, load_chat_template
from distserve_rt.worker.multiproc_executor import load_model_config

logger = init_logger(__name__)


def make_engine_core(
    config: EngineConfig,
    placement: Placement | str | None = None,
    disagg_config: DisaggConfig | None = None,
) -> EngineCore:
    """The engine of `placement` (colocated by default; see `Placement.parse`). A colocated
    placement's replicas (a placement file's TP x PP and count) set `config`'s parallel
    sizes (`Placement.apply_to`: ValueError when they contradict it)."""
    placement = Placement.parse(placement)
    config = resolve_model_files(placement.apply_to(config))
    tokenizer = load_tokenizer(config, load_model_config(config.model))
    if config.data_parallel_size > 1:
        from distserve_rt.engine.data_parallel import DataParallelCore  # spawns processes

        return DataParallelCore(config, disagg_config, tokenizer=tokenizer)
    if not placement.is_disaggregated:
        return LLMEngine(config, tokenizer=tokenizer)
    from distserve_rt.engine.controller import Controller  # spawns processes: only when asked

    return Controller(config, placement, disagg_config, tokenizer=tokenizer)


def resolve_model_files(config: EngineConfig) -> EngineConfig:
    """`config` with hub ids (model, tokenizer) replaced by their snapshot directories in
    the local Hugging Face cache (`models.hf_cache`), so that every process reads the same
    files; the revisions are spent doing so. FileNotFoundError when one is not cached."""
    changes: dict = {"revision": None, "tokenizer_revision": None}
    if not config.model.startswith(DUMMY_PREFIX):
        changes["model"] = resolve_model_path(config.model, config.revision)
    elif config.revision is not None:
        raise ValueError(
            f"revision {config.revision!r} applies to hub ids; model {config.model!r} is a preset"
        )
    if config.tokenizer is not None:
        changes["tokenizer"] = resolve_model_path(
            config.tokenizer, config.tokenizer_revision, what="tokenizer"
        )
    elif config.tokenizer_revision is not None:
        raise ValueError("tokenizer_revision needs tokenizer (a hub id of the tokenizer)")
    if config.trust_remote_code:
        logger.info(
            "trust_remote_code: accepted, but custom modeling code is never run; the built-in "
            "implementation of the checkpoint's architecture is used"
        )
    return config.replace(**changes)


def load_tokenizer(config: EngineConfig, model_config: ModelConfig) -> Tokenizer:
    """The model's tokenizer (``tokenizer.json`` of an HF directory, bytes for dummy:), or
    ``config.tokenizer``'s, with ``config.chat_template`` replacing its template."""
    tokenizer = get_tokenizer(config.tokenizer or config.model, model_config)
    if config.chat_template is not None:
        tokenizer.chat_template = load_chat_template(config.chat_template)
    return tokenizer

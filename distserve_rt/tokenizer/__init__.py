"""Text <-> token ids: HF ``tokenizer.json`` files and the dummy models' byte tokenizer."""

from __future__ import annotations

from distserve_rt.models.config import ModelConfig
from distserve_rt.models.loader import DUMMY_PREFIX
from distserve_rt.models.presets import get_preset
from distserve_rt.tokenizer.base import DEFAULT_CHAT_TEMPLATE, Tokenizer, load_chat_template
from distserve_rt.tokenizer.byte_tokenizer import ByteTokenizer
from distserve_rt.tokenizer.hf_tokenizer import HFTokenizer


def get_tokenizer(model: str, config: ModelConfig | None = None) -> Tokenizer:
    """The tokenizer for `model` as `models.load_model` takes it: a `ByteTokenizer` for
    ``dummy:<preset>`` (bos/eos/vocab from `config` or the preset), an `HFTokenizer` for a
    directory (bos/eos from its tokenizer_config.json, else from `config`)."""
    if model.startswith(DUMMY_PREFIX):
        config = config or get_preset(model[len(DUMMY_PREFIX) :])
        return ByteTokenizer(
            config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id
        )
    return HFTokenizer(
        model,
        bos_token_id=config.bos_token_id if config else None,
        eos_token_id=config.eos_token_id if config else None,
    )


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "get_tokenizer",
    "load_chat_template",
]

"""`HFTokenizer`: a model directory's ``tokenizer.json`` through the `tokenizers` library
(not transformers), with bos/eos, ``add_bos_token`` and the chat template from
``tokenizer_config.json`` (or ``chat_template.jinja``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer

from distserve_rt.tokenizer.base import Message, chat_template_output


class HFTokenizer:
    """Tokenizer of a local HF directory.

    bos/eos ids: the ``bos_token``/``eos_token`` of ``tokenizer_config.json`` when it names
    them, else the model config's ids passed here. Special tokens at encode time are what
    ``tokenizer.json``'s post-processor adds; when ``tokenizer_config.json`` says
    ``add_bos_token: true`` and the post-processor did not add it, bos is prepended (older
    Llama tokenizers keep that flag outside tokenizer.json).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} has no tokenizer.json (sentencepiece tokenizer.model files are not "
                "supported: save the tokenizer with transformers' save_pretrained to get one)"
            )
        self._tokenizer = _RustTokenizer.from_file(str(path))
        config = _read_json(directory / "tokenizer_config.json")
        self.bos_token_id = self._special_id(config, "bos_token", bos_token_id)
        self.eos_token_id = self._special_id(config, "eos_token", eos_token_id)
        self._add_bos = bool(config.get("add_bos_token", False))
        self.chat_template = _chat_template(directory, config)
        self._special_tokens = {
            key: _token_text(config.get(key)) or ""
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Added tokens marked special in tokenizer.json, plus bos/eos (sorted)."""
        ids = {i for i, tok in self._tokenizer.get_added_tokens_decoder().items() if tok.special}
        ids.update(i for i in (self.bos_token_id, self.eos_token_id) if i is not None)
        return sorted(ids)

    def _special_id(self, config: dict[str, Any], key: str, default: int | None) -> int | None:
        text = _token_text(config.get(key))
        if text is None:
            return default
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json's {key} {text!r} is not in tokenizer.json")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self._add_bos and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """The model's template (or `chat_template`), `tokenizer.base.DEFAULT_CHAT_TEMPLATE`
        if it has none; see `tokenizer.base.chat_template_output`."""
        return chat_template_output(
            self, messages, add_generation_prompt, tokenize, chat_template,
            continue_final_message, self._special_tokens, template_kwargs,
        )  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():  # transformers >= 4.43 saves the template on its own
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"tokenizer_config.json has chat templates {sorted(named)}, none named 'default'"
            )
        template = named["default"]
    return template

"""`ByteTokenizer`: the built-in tokenizer of ``dummy:<preset>`` models (no files, no
downloads, deterministic).

Ids ``0 .. NUM_SPECIAL_IDS - 1`` are special (the tiny presets' bos/eos/pad live there:
llama-tiny bos 1, eos 2; opt-tiny bos = eos 2, pad 1), and so are the bos/eos/pad ids of
larger presets past the byte range (llama-3's 128000/128001); UTF-8 byte ``b`` is id
``b + NUM_SPECIAL_IDS``. A model's vocabulary may be larger than the ``NUM_SPECIAL_IDS +
256`` ids this uses, and a random model emits any of them, so ids past the byte range decode
as byte ``(id - NUM_SPECIAL_IDS) % 256``: every id turns into some text. Invalid UTF-8
decodes with U+FFFD replacement characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distserve_rt.tokenizer.base import Message, chat_template_output

NUM_SPECIAL_IDS = 3


class ByteTokenizer:
    """UTF-8 bytes as tokens (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
    ) -> None:
        if vocab_size < NUM_SPECIAL_IDS + 256:
            raise ValueError(
                f"vocab_size must be >= {NUM_SPECIAL_IDS + 256} for the byte tokenizer, "
                f"got {vocab_size}"
            )
        byte_ids = range(NUM_SPECIAL_IDS, NUM_SPECIAL_IDS + 256)
        specials = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
        specials["pad_token_id"] = pad_token_id
        for name, value in specials.items():
            if value is not None and (value in byte_ids or not 0 <= value < vocab_size):
                raise ValueError(
                    f"{name} must be None or in [0, {vocab_size}) outside the byte ids "
                    f"[{byte_ids.start}, {byte_ids.stop}), got {value}"
                )
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template: str | None = None
        self._special_text = {i: "<unk>" for i in range(NUM_SPECIAL_IDS)}
        # eos after bos: a preset whose bos is its eos (OPT) prints "</s>".
        for value, text in ((pad_token_id, "<pad>"), (bos_token_id, "<s>"), (eos_token_id, "</s>")):
            if value is not None:
                self._special_text[value] = text

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that are not text: ``0 .. NUM_SPECIAL_IDS - 1`` and bos/eos/pad (sorted)."""
        return sorted(self._special_text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + NUM_SPECIAL_IDS for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
            if token not in self._special_text:
                pending.append((token - NUM_SPECIAL_IDS) % 256)
                continue
            if not skip_special_tokens:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                out.append(self._special_text[token])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

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
        """`tokenizer.base.DEFAULT_CHAT_TEMPLATE` unless a template is given (dummy models
        have none); see `tokenizer.base.chat_template_output`."""
        special = {"bos_token": "", "eos_token": ""}
        return chat_template_output(
            self, messages, add_generation_prompt, tokenize, chat_template,
            continue_final_message, special, template_kwargs,
        )  # fmt: skip

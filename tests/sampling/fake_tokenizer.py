"""A byte-level tokenizer implementing the Tokenizer protocol, for detokenizer tests.

Ids: 0 = BOS, 1 = EOS (special), 2..257 = single bytes, then a few multi-byte merges, some
of which split UTF-8 characters (so a character's bytes span tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

BOS, EOS = 0, 1
_SPECIAL = {BOS: "<s>", EOS: "</s>"}
_BYTE_BASE = 2
_MERGES = [b"ab", b"STOP", b" the", "é".encode(), "€".encode()[:2], "€".encode()[2:] + b"x"]


class ByteTokenizer:
    eos_token_id = EOS
    bos_token_id = BOS
    vocab_size = _BYTE_BASE + 256 + len(_MERGES)

    def __init__(self) -> None:
        self.decode_lengths: list[int] = []

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < _BYTE_BASE + 256:
            return bytes([token_id - _BYTE_BASE])
        return _MERGES[token_id - _BYTE_BASE - 256]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [_BYTE_BASE + b for b in text.encode()]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        parts: list[str] = []
        run = b""
        for token_id in ids:
            if token_id in _SPECIAL:
                parts.append(run.decode(errors="replace"))
                run = b""
                if not skip_special_tokens:
                    parts.append(_SPECIAL[token_id])
            else:
                run += self.token_bytes(token_id)
        parts.append(run.decode(errors="replace"))
        return "".join(parts)


def merge_ids() -> list[int]:
    """Ids of the multi-byte merge tokens."""
    return list(range(_BYTE_BASE + 256, ByteTokenizer.vocab_size))


def byte_ids(data: bytes) -> list[int]:
    return [_BYTE_BASE + b for b in data]

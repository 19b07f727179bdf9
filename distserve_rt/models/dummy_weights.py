"""Random weights for ``dummy:<preset>`` models (vLLM's ``--load-format dummy``).

Values come from a counter-based hash of (seed, tensor name, element index), generated only
for the slice a rank reads. So a dummy model is the same model whatever the TP/PP layout
(TP=2 logits equal TP=1 logits, as with a real checkpoint), it is deterministic given the
seed, and a TP rank of a 175B dummy never materialises more than its own shard.

Distribution: uniform, std 0.02 for matrices and biases (HF's initialisation, so activations
stay finite in bf16), norm weights 1. The embeddings are larger, because with everything at
0.02 the attention output (an average over the context) swamps the current token's
embedding and a random model repeats one token forever: untied token embeddings get std 0.2
(the residual stream then carries the current token) and OPT's position table 0.5 (tied
embeddings must stay small: a dominant token embedding would make the tied LM head echo the
current token). With these the tiny presets emit varied greedy tokens.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from distserve_rt.models.weights import WeightMap

STD = 0.02
UNTIED_TOKEN_EMBEDDING_STD = 0.2
POSITION_EMBEDDING_STD = 0.5
_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31, so every product of a 32-bit value fits int64 without overflow.
_MUL1, _MUL2 = 0x7FEB352D, 0x5BD1E995
_MAX_CHUNK = 1 << 24  # elements generated at once (bounds the int64 index temporaries)


class DummyTensor:
    """A lazily generated full tensor with the `SliceableTensor` interface of
    `layers.weight_utils` (``get_shape``; ``[a:b]`` rows or ``[:, a:b]`` columns)."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        seed: int,
        device: Any,
        *,
        std: float = STD,
        fill: float | None = None,
    ) -> None:
        """Values uniform with std `std`, or all `fill` when given."""
        self.name, self.shape, self.device = name, tuple(shape), device
        self.std, self.fill = std, fill
        self.key = (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & _MASK32

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, cols = _as_ranges(index, self.shape)
        out_shape = (len(rows),) if len(self.shape) == 1 else (len(rows), len(cols))
        if self.fill is not None:
            return torch.full(out_shape, self.fill, dtype=torch.float32, device=self.device)
        if len(self.shape) == 1:
            return self._values(torch.arange(rows.start, rows.stop, device=self.device))
        return self._matrix(rows, cols)

    def _matrix(self, rows: range, cols: range) -> torch.Tensor:
        out = torch.empty(len(rows), len(cols), dtype=torch.float32, device=self.device)
        step = max(1, _MAX_CHUNK // max(1, len(cols)))
        col_idx = torch.arange(cols.start, cols.stop, device=self.device)
        for r0 in range(0, len(rows), step):
            row_idx = torch.arange(
                rows.start + r0, min(rows.stop, rows.start + r0 + step), device=self.device
            )
            flat = row_idx[:, None] * self.shape[1] + col_idx[None, :]
            out[r0 : r0 + len(row_idx)] = self._values(flat)
        return out

    def _values(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Uniform(-a, a) with std `self.std` from each element's index (a 32-bit hash)."""
        x = (flat_index & _MASK32) ^ self.key
        x = ((x ^ (x >> 16)) * _MUL1) & _MASK32
        x = ((x ^ (x >> 15)) * _MUL2) & _MASK32
        x = x ^ (x >> 16)
        unit = x.to(torch.float32) * (1.0 / 2**32)  # [0, 1)
        return (2.0 * unit - 1.0) * (self.std * math.sqrt(3.0))


def _as_ranges(index: Any, shape: tuple[int, ...]) -> tuple[range, range]:
    """The row and column ranges of ``[a:b]``, ``[:, a:b]`` or ``[:]`` (step 1 only)."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > len(shape) or not all(isinstance(p, slice) for p in parts):
        raise ValueError(f"DummyTensor takes [a:b] or [:, a:b] slices, got {index!r}")
    ranges = []
    for dim, size in enumerate(shape[:2]):
        part = parts[dim] if dim < len(parts) else slice(None)
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"DummyTensor slices must have step 1, got {part!r}")
        ranges.append(range(start, stop))
    return ranges[0], (ranges[1] if len(ranges) > 1 else range(0))


def dummy_tensors(
    weight_map: WeightMap, seed: int, device: Any, *, tie_word_embeddings: bool
) -> dict[str, DummyTensor]:
    """One `DummyTensor` per checkpoint name of `weight_map` (see the module docstring)."""
    tensors = {}
    for name, target in weight_map.items():
        std, fill = STD, None
        if len(target.shape) == 1 and "norm" in name and name.endswith(".weight"):
            fill = 1.0
        elif "embed_positions" in name:
            std = POSITION_EMBEDDING_STD
        elif "embed_tokens" in name and not tie_word_embeddings:
            std = UNTIED_TOKEN_EMBEDDING_STD
        tensors[name] = DummyTensor(name, target.shape, seed, device, std=std, fill=fill)
    return tensors

"""Rotary position embedding (RoPE), neox style as HF Llama: the head's first and second
halves are the two coordinates of each rotated pair.

Supported ``rope_scaling``: None / ``{"rope_type": "default"}`` and Llama-3.1's
``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"}``. Others ("linear", "dynamic", "yarn", ...) raise
ValueError: silently running them unscaled would produce wrong text at long context.

On CPU, cos/sin come from a float32 table ``[num_positions, 2, head_dim / 2]`` shared by
every layer (and every model with the same frequencies) and grown by doubling to the
largest position seen, so a 128k-context model that serves 4k contexts holds a 4k table;
the rotation is one native op in place (`ops.layer_ops.rotary`): eager RoPE recomputed
cos/sin in every layer and built rotate_half with ``cat`` (7% of a CPU step). On CUDA they
are computed from the positions each step, as HF does.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch

from distserve_rt.ops import layer_ops

SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """The scaling's type ("default" when None); ValueError for types we do not implement."""
    if rope_scaling is None:
        return "default"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: "
            f"{SUPPORTED_ROPE_TYPES} (rope_scaling={rope_scaling})"
        )
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_KEYS if key not in rope_scaling]
        if missing:
            raise ValueError(f"llama3 rope_scaling lacks {missing}: {rope_scaling}")
    return rope_type


def inv_frequencies(
    head_dim: int, base: float, rope_scaling: dict[str, Any] | None
) -> torch.Tensor:
    """float32 ``[head_dim / 2]`` inverse frequencies, scaled as ``rope_scaling`` says."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type_of(rope_scaling) == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1: long wavelengths slowed by ``factor``, short ones kept, smooth between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CosSinTable:
    """The CPU cos/sin table of one set of inverse frequencies, grown on demand."""

    _MIN_POSITIONS = 4096

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.float().cpu()
        self.table = layer_ops.reference_cos_sin(self.inv_freq, self._MIN_POSITIONS)
        self._covered: torch.Tensor | None = None

    def covering(self, positions: torch.Tensor) -> torch.Tensor:
        """The table, grown to cover `positions` (checked once per step: every layer gets
        the same positions tensor)."""
        if positions is not self._covered:
            need = int(positions.max()) + 1 if positions.numel() else 0
            if need > self.table.shape[0]:
                size = self.table.shape[0]
                while size < need:
                    size *= 2
                self.table = layer_ops.reference_cos_sin(self.inv_freq, size)
            self._covered = positions
        return self.table


@functools.cache
def _shared_table(head_dim: int, base: float, scaling_key: str | None) -> CosSinTable:
    scaling = None if scaling_key is None else json.loads(scaling_key)
    return CosSinTable(inv_frequencies(head_dim, base, scaling))


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to query and key: ``positions [num_tokens]`` int64, ``query
    [num_tokens, num_heads, head_dim]``, ``key [num_tokens, num_kv_heads, head_dim]``;
    returns (query, key) rotated, in their dtype: on CPU the same tensors, rotated in place."""

    def __init__(
        self,
        head_dim: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = inv_frequencies(head_dim, base, rope_scaling)
        # Computed on CPU first: on the "meta" device there are no values to compute with.
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        scaling_key = None if rope_scaling is None else json.dumps(rope_scaling, sort_keys=True)
        self._table_key = (head_dim, float(base), scaling_key)
        self._cpu_table: CosSinTable | None = None  # looked up on the first CPU call

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """``[num_tokens, 1, head_dim]`` cos and sin in `dtype` (computed in float32)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        if query.is_cpu:  # in place: query and key are views of the qkv projection
            if self._cpu_table is None:
                self._cpu_table = _shared_table(*self._table_key)
            layer_ops.rotary(positions, query, key, self._cpu_table.covering(positions))
            return query, key
        cos, sin = self.cos_sin(positions, query.dtype)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        return query, key

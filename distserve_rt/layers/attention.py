"""Paged attention for one layer of a mixed batch: prefill sequences first, then decodes.

This is the seam between the model runner (which builds `AttentionMetadata` once per step
from the block manager) and the models (which call `PagedAttention` in every layer).

Token layout of a step (``num_tokens = num_prefill_tokens + num_decode_tokens``)::

    [ prefill seq 0 new tokens | prefill seq 1 ... | decode seq 0 | decode seq 1 | ... ]

A prefill sequence's new tokens may continue a prefix already in the cache (chunked prefill,
or a recomputed request): ``prefill_prefix_lens`` says how many; their positions start
there. A decode sequence has exactly one new token. Every new token's K/V is written to
the paged cache at ``slot_mapping`` (negative = padding, not written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distserve_rt import ops


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step batch description shared by every layer (tensors on the model's device)."""

    num_prefill_tokens: int
    num_decode_tokens: int
    """One per decode sequence."""
    slot_mapping: torch.Tensor | None
    """int64 ``[num_tokens]``; None only when running without a KV cache (profiling)."""
    # Prefill part.
    prefill_cu_seqlens: torch.Tensor | None = None
    """int32 ``[num_prefills + 1]`` over the prefill tokens."""
    prefill_max_seqlen: int = 0
    """Upper bound of new tokens per prefill sequence (host int: no device sync)."""
    prefill_prefix_lens: torch.Tensor | None = None
    """int32 ``[num_prefills]`` tokens already cached before this chunk; None = all zero."""
    prefill_block_table: torch.Tensor | None = None
    """int32 ``[num_prefills, max_blocks]``; needed with ``prefill_prefix_lens``."""
    # Decode part.
    decode_block_table: torch.Tensor | None = None
    """int32 ``[num_decodes, max_blocks]``."""
    decode_seq_lens: torch.Tensor | None = None
    """int32 ``[num_decodes]``: cached tokens including this step's new one."""
    decode_max_seq_len: int = 0
    """Upper bound of ``decode_seq_lens`` (host int)."""

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class PagedAttention(torch.nn.Module):
    """Attention of one layer over the paged KV cache (no weights; the model projects q/k/v)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``query [T, num_heads, head_dim]``, ``key``/``value [T, num_kv_heads, head_dim]``;
        ``kv_cache``: this layer's view ``[num_blocks, 2, num_kv_heads, block_size,
        head_dim]`` (`core.kv_cache.layer_view`) or None. Returns ``[T, num_heads, head_dim]``.
        """
        out = torch.empty_like(query)
        num_p = metadata.num_prefill_tokens
        if num_p:
            with_cache = kv_cache is not None
            ops.prefill_attention(
                query[:num_p],
                key[:num_p],
                value[:num_p],
                metadata.prefill_cu_seqlens,
                max_seqlen=metadata.prefill_max_seqlen,
                softmax_scale=self.scale,
                kv_cache=kv_cache,
                block_table=metadata.prefill_block_table if with_cache else None,
                prefix_lens=metadata.prefill_prefix_lens if with_cache else None,
                slot_mapping=metadata.slot_mapping[:num_p] if with_cache else None,
                out=out[:num_p],
            )
        if metadata.num_decode_tokens:
            if kv_cache is None:
                raise ValueError("decode tokens need a KV cache (kv_cache is None)")
            ops.write_kv(key[num_p:], value[num_p:], kv_cache, metadata.slot_mapping[num_p:])
            ops.decode_attention(
                query[num_p:],
                kv_cache,
                metadata.decode_block_table,
                metadata.decode_seq_lens,
                max_seq_len=metadata.decode_max_seq_len,
                softmax_scale=self.scale,
                out=out[num_p:],
            )
        return out

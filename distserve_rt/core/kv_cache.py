"""The paged KV pool: one allocation per instance, block-major across layers.

Layout (elements)::

    pool      [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
    pool[:, layer] -> kv_cache [num_blocks, 2, num_kv_heads, block_size, head_dim]

Why block-major: one block holds one request's KV for *every* layer in one contiguous span
(num_layers * 2 * num_kv_heads * block_size * head_dim elements), so moving a request from a
prefill pool to a decode pool is one copy per block (``copy_blocks``), not one per layer,
which is what keeps the transfer engine's fixed cost per request small.

Why heads before tokens inside a block (HND, as FlashInfer's HND layout): attention reads
one KV head of one block as a dense [block_size, head_dim] tile, so decode attention streams
contiguous memory per (sequence, kv head) and each KV head is read once per GQA group.
The cost is on the write side: ``write_kv`` scatters a token's heads with a stride of
block_size * head_dim, which is cheap next to attention (one token per step per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distserve_rt.core.block_manager import ALLOWED_BLOCK_SIZES
from distserve_rt.ops._checks import FLOAT_DTYPES


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of one instance's KV pool."""

    num_blocks: int
    """Blocks in the pool; each holds `block_size` tokens of every layer."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    """Tokens per block (8, 16 or 32)."""
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is a bug, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if type(self.block_size) is not int or self.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {ALLOWED_BLOCK_SIZES}, got {self.block_size!r}"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_blocks,
            self.num_layers,
            2,
            self.num_kv_heads,
            self.block_size,
            self.head_dim,
        )

    @property
    def block_numel(self) -> int:
        """Elements of one block (all layers, K and V)."""
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def allocate_kv_pool(spec: KVCacheSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero-filled pool `[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`."""
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)


def layer_view(pool: torch.Tensor, layer: int) -> torch.Tensor:
    """`kv_cache` of one layer: `[num_blocks, 2, num_kv_heads, block_size, head_dim]`, a view
    whose dim 0 keeps the pool's block stride (what the attention ops take)."""
    if pool.dim() != 6 or pool.shape[2] != 2:
        raise ValueError(
            "pool must have shape [num_blocks, num_layers, 2, num_kv_heads, block_size, "
            f"head_dim], got {tuple(pool.shape)}"
        )
    if not 0 <= layer < pool.shape[1]:
        raise ValueError(f"layer must be in [0, {pool.shape[1]}), got {layer}")
    return pool[:, layer]

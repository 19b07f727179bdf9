"""Where this process sits in an instance's TP x PP grid, and the collectives it needs.

A model is built with a `ParallelContext`; its layers shard weights by ``tp_rank`` and call
`ParallelContext.all_reduce` / `all_gather`, which are no-ops when ``tp_size == 1`` so the
single-process path has no torch.distributed dependency at all. Pipeline stages own the
contiguous layer range `partition_layers` gives them; a stage's KV pool holds only its
layers (pool layer index = global layer - start_layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelContext:
    """Ranks and process groups of one worker inside one instance."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: Any = None
    """torch.distributed ProcessGroup of this worker's TP peers (None when tp_size == 1)."""

    def __post_init__(self) -> None:
        for size, rank in (("tp_size", "tp_rank"), ("pp_size", "pp_rank")):
            s, r = getattr(self, size), getattr(self, rank)
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"{size} must be a positive int, got {s!r}")
            if not isinstance(r, int) or not 0 <= r < s:
                raise ValueError(f"{rank} must be in [0, {size}={s}), got {r!r}")
        if self.tp_size > 1 and self.tp_group is None:
            raise ValueError("tp_group is required when tp_size > 1")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place; returns ``tensor``."""
        if self.tp_size > 1:
            torch.distributed.all_reduce(tensor, group=self.tp_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every TP rank's ``tensor`` along ``dim`` (rank order)."""
        if self.tp_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)


def partition_layers(num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` layer ranges per stage; earlier stages take the remainder.

    PP must not exceed the layer count (a stage without layers does nothing but add a hop).
    """
    if not isinstance(pp_size, int) or pp_size < 1:
        raise ValueError(f"pp_size must be a positive int, got {pp_size!r}")
    if pp_size > num_layers:
        raise ValueError(f"pp_size ({pp_size}) exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    ranges, start = [], 0
    for stage in range(pp_size):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges

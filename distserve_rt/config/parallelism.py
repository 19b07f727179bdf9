"""`Parallelism`: one instance's tensor-parallel x pipeline-parallel sizes.

The one spelling of TP x PP that the engine, the disaggregated launcher and the KV
re-slicing (`transfer.plan_kv_pulls`) pass around; `EngineConfig` and `PhaseConfig` keep
their public fields and expose it as ``.parallelism``.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.config.validation import check_range


@dataclass(frozen=True, slots=True)
class Parallelism:
    """An instance's TP x PP: ``tp_size * pp_size`` ranks (worker processes or devices)."""

    tp_size: int = 1
    """Ranks each layer is sharded over (attention and KV heads split between them)."""
    pp_size: int = 1
    """Pipeline stages (consecutive layer ranges)."""

    def __post_init__(self) -> None:
        check_range("tp_size", self.tp_size, low=1, integer=True)
        check_range("pp_size", self.pp_size, low=1, integer=True)

    @property
    def world_size(self) -> int:
        """Ranks of the instance (1: the model runs in the instance's own process)."""
        return self.tp_size * self.pp_size

    def __str__(self) -> str:
        return f"tp={self.tp_size}, pp={self.pp_size}"


def check_parallel_sizes(
    num_heads: int, num_kv_heads: int, num_layers: int, tp_size: int, pp_size: int
) -> None:
    """Start-up check of an instance's TP x PP against the model's shape (ValueError).

    TP must divide both head counts (`layers.linear.QKVParallelLinear` does not replicate kv
    heads) and PP must not exceed the layer count (`partition_layers`).
    """
    for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide the model's {name} ({heads})"
            )
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} layers"
        )

"""Tensor- and pipeline-parallel groups (torch.distributed: gloo on CPU, NCCL on GPU)."""

from distserve_rt.distributed.parallel_state import (
    ParallelContext,
    check_parallel_sizes,
    partition_layers,
)

__all__ = ["ParallelContext", "check_parallel_sizes", "partition_layers"]

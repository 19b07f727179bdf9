"""Tensor- and pipeline-parallel groups (torch.distributed: gloo on CPU, NCCL on GPU)."""

from distserve_rt.config.parallelism import check_parallel_sizes
from distserve_rt.distributed.parallel_state import ParallelContext, partition_layers

__all__ = ["ParallelContext", "check_parallel_sizes", "partition_layers"]

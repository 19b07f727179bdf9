"""Requests, the paged KV pool and its block manager, schedulers."""

from distserve_rt.core.block_manager import (
    AllocStatus,
    AppendResult,
    BlockManager,
    BlockManagerStats,
)
from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view
from distserve_rt.core.stop_checker import FinishReason, StopChecker, StopCheckResult

__all__ = [
    "AllocStatus",
    "AppendResult",
    "BlockManager",
    "BlockManagerStats",
    "FinishReason",
    "IncrementalDetokenizer",
    "KVCacheSpec",
    "StopCheckResult",
    "StopChecker",
    "allocate_kv_pool",
    "layer_view",
]

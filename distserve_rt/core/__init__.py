"""Requests, the paged KV pool and its block manager, schedulers."""

from distserve_rt.core.block_manager import (
    AllocStatus,
    AppendResult,
    BlockManager,
    BlockManagerStats,
)
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view

__all__ = [
    "AllocStatus",
    "AppendResult",
    "BlockManager",
    "BlockManagerStats",
    "KVCacheSpec",
    "allocate_kv_pool",
    "layer_view",
]

"""Requests, the paged KV pool and its block manager, schedulers.

The KV pool's names (`KVCacheSpec`, `allocate_kv_pool`, `layer_view`) load on first use:
they need torch, and the planner's simulator drives the schedulers without it.
"""

from __future__ import annotations

import importlib

from distserve_rt.core.block_manager import (
    AllocStatus,
    AppendResult,
    BlockManager,
    BlockManagerStats,
)
from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.stop_checker import FinishReason, StopChecker, StopCheckResult

_LAZY = {
    name: "distserve_rt.core.kv_cache" for name in ("KVCacheSpec", "allocate_kv_pool", "layer_view")
}

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


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'distserve_rt.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value

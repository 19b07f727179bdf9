"""distserve_rt: a disaggregated prefill/decode LLM serving runtime (DistServe, OSDI'24)."""

from distserve_rt import ops
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view

__version__ = "0.1.0"

__all__ = ["KVCacheSpec", "__version__", "allocate_kv_pool", "layer_view", "ops"]

"""distserve_rt: a disaggregated prefill/decode LLM serving runtime (DistServe, OSDI'24)."""

from distserve_rt import ops
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view
from distserve_rt.engine import LLM, EngineConfig, LLMEngine
from distserve_rt.outputs import CompletionOutput, RequestOutput
from distserve_rt.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "KVCacheSpec",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "__version__",
    "allocate_kv_pool",
    "layer_view",
    "ops",
]

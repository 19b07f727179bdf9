"""distserve_rt: a disaggregated prefill/decode LLM serving runtime (DistServe, OSDI'24)."""

import os

# torch and our CPU kernels share one libgomp, whose default is to spin after every parallel
# region. With several processes of this runtime on the same cores (prefill and decode
# instances, TP workers) the spinning threads starve each other: llama-tiny decode steps went
# from ~9 ms to 100-400 ms on a 2-core machine. PASSIVE lets idle threads sleep. libgomp reads
# the variable when it loads, so this only applies when torch is not imported yet; a value the
# user set wins. (Child processes inherit it.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ruff: noqa: E402
from distserve_rt import ops
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool, layer_view
from distserve_rt.engine import LLM, EngineConfig, LLMEngine
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.engine.placement import DisaggConfig, PhaseConfig, Placement
from distserve_rt.outputs import CompletionOutput, RequestOutput
from distserve_rt.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "DisaggConfig",
    "PhaseConfig",
    "Placement",
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

"""distserve_rt: a disaggregated prefill/decode LLM serving runtime (DistServe, OSDI'24).

The public names below are imported on first use (PEP 562), so ``import distserve_rt._C``,
``distserve_rt.ops`` or ``distserve_rt.transfer`` loads kernels and transports without the
engine, the workers or the HTTP server.
"""

import importlib
import os

# torch and our CPU kernels share one libgomp, whose default is to spin after every parallel
# region. With several processes of this runtime on the same cores (prefill and decode
# instances, TP workers) the spinning threads starve each other: llama-tiny decode steps went
# from ~9 ms to 100-400 ms on a 2-core machine. PASSIVE lets idle threads sleep. libgomp reads
# the variable when it loads, so this only applies when torch is not imported yet; a value the
# user set wins. (Child processes inherit it.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY = {
    "LLM": "distserve_rt.engine.llm",
    "AsyncLLM": "distserve_rt.engine.async_llm",
    "LLMEngine": "distserve_rt.engine.llm_engine",
    "EngineConfig": "distserve_rt.config",
    "DisaggConfig": "distserve_rt.config",
    "PhaseConfig": "distserve_rt.config",
    "Placement": "distserve_rt.config",
    "CompletionOutput": "distserve_rt.outputs",
    "RequestOutput": "distserve_rt.outputs",
    "Logprob": "distserve_rt.logprobs",
    "SamplingParams": "distserve_rt.sampling_params",
    "KVCacheSpec": "distserve_rt.core.kv_cache",
    "allocate_kv_pool": "distserve_rt.core.kv_cache",
    "layer_view": "distserve_rt.core.kv_cache",
}
"""Public name -> the module that defines it (tests/test_import_layers.py reads this too)."""

__all__ = ["__version__", "ops", *_LAZY]


def __getattr__(name: str) -> object:
    if name == "ops":  # a subpackage: importing it binds it on this module
        return importlib.import_module("distserve_rt.ops")
    if name not in _LAZY:
        raise AttributeError(f"module 'distserve_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

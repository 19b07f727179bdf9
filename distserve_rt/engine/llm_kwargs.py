"""`LLM(...)`'s keyword arguments, as a vLLM user passes them, mapped onto `EngineConfig`.

Each vLLM keyword is one of:

- honoured: an `EngineConfig` field of the same name (``tokenizer``, ``revision``,
  ``trust_remote_code``, ``seed``, ``dtype``, ``max_model_len``, ``tensor_parallel_size``,
  ...), or a vLLM name with an equivalent (``disable_log_stats``);
- accepted, nothing to do (`NOTHING_TO_DO`, logged with the reason): ``enforce_eager`` (there
  are no CUDA graphs here: every step runs eagerly), ...;
- honoured only at the one value this engine has (`ONLY_VALUES`), else a one-line ValueError
  saying why (``quantization="awq"``: quantized checkpoints are not supported);
- unknown: a TypeError naming it and the closest accepted names (difflib).
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from distserve_rt.config import EngineConfig
from distserve_rt.logger import init_logger

logger = init_logger(__name__)

ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))

# vLLM keyword -> why it changes nothing here (any value is accepted).
NOTHING_TO_DO: dict[str, str] = {
    "enforce_eager": "there are no CUDA graphs here: every step runs eagerly",
    "max_seq_len_to_capture": "there are no CUDA graphs to capture",
    "disable_custom_all_reduce": "tensor-parallel all-reduce is always torch.distributed's",
    "swap_space": "preempted requests are recomputed, never swapped to CPU memory",
    "disable_async_output_proc": "outputs are processed after each step, synchronously",
}

# vLLM keyword -> (the values meaning what this engine does, why other values are refused).
ONLY_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "tokenizer_mode": (("auto",), "tokenizers are read from tokenizer.json (the fast one)"),
    "skip_tokenizer_init": ((False,), "the engine detokenizes every output"),
    "quantization": ((None,), "quantized checkpoints are not supported"),
    "kv_cache_dtype": (("auto",), "the KV cache takes the weights' dtype"),
    "cpu_offload_gb": ((0,), "weights are never offloaded to CPU memory"),
    "load_format": (("auto", "safetensors"), "checkpoints load from *.safetensors files only"),
    "download_dir": (
        (None,),
        "nothing is downloaded: hub ids resolve in the local Hugging Face cache (HF_HUB_CACHE)",
    ),
    "hf_token": ((None,), "nothing is downloaded, so no token is used"),
    "enable_lora": ((False,), "LoRA adapters are not supported"),
    "speculative_config": ((None,), "speculative decoding is not supported"),
    "hf_overrides": ((None,), "config.json is used as written"),
    "compilation_config": ((None, 0), "the model is not compiled (no torch.compile, no graphs)"),
    "distributed_executor_backend": ((None, "mp"), "workers are local processes"),
    "task": (("auto", "generate"), "the engine only generates text"),
}

# vLLM keywords with an EngineConfig equivalent under another name.
RENAMED = frozenset({"disable_log_stats"})

KNOWN = ENGINE_FIELDS | NOTHING_TO_DO.keys() | ONLY_VALUES.keys() | RENAMED


def engine_config_from_kwargs(**kwargs: Any) -> EngineConfig:
    """The `EngineConfig` of `LLM`'s keyword arguments (see the module docstring).

    Raises TypeError for an unknown keyword (with "did you mean"), ValueError for a value
    this engine cannot honour, and `EngineConfig`'s ValueErrors for bad values."""
    unknown = [name for name in kwargs if name not in KNOWN]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(KNOWN), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise TypeError(
            f"LLM() got an unexpected keyword argument {name!r}{hint} (the accepted ones: "
            "distserve_rt.engine.llm_kwargs)"
        )
    config = {}
    for name, value in kwargs.items():
        if name in NOTHING_TO_DO:
            logger.info("LLM(%s=%r): accepted, nothing to do: %s", name, value, NOTHING_TO_DO[name])
        elif name in ONLY_VALUES:
            allowed, why = ONLY_VALUES[name]
            if value not in allowed:
                shown = " or ".join(repr(a) for a in allowed)
                raise ValueError(f"{name}={value!r} is not supported ({why}); pass {shown}")
        elif name == "disable_log_stats":
            if value:
                config["log_stats_interval_s"] = 0.0
        else:
            config[name] = value
    _check_gpu_memory_utilization(config)
    return EngineConfig(**config)


def _check_gpu_memory_utilization(config: dict[str, Any]) -> None:
    """A fraction of GPU memory means nothing on CPU: refused there, rather than ignored."""
    device = str(config.get("device", "cpu"))
    if "gpu_memory_utilization" in config and device == "cpu":
        raise ValueError(
            f"gpu_memory_utilization={config['gpu_memory_utilization']!r} sizes GPU memory but "
            "device is 'cpu'; size the CPU KV pool with kv_cache_memory_bytes, or pass "
            "device='cuda'"
        )

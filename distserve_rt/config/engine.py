"""`EngineConfig`: everything a colocated engine instance is built from.

One schema for Python kwargs (``LLM(model, **engine_kwargs)``), the CLI and config files:
each field's docstring is its help text. Validated on construction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.config.scheduler import POLICY_NAMES, SchedulerConfig
from distserve_rt.config.validation import check_range
from distserve_rt.core.block_manager import ALLOWED_BLOCK_SIZES

if TYPE_CHECKING:  # torch loads only with the model: `drt-run plan` and `--help` never need it
    import torch

GiB = 1 << 30


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Configuration of one colocated engine (one instance doing prefill and decode)."""

    model: str = "dummy:llama-tiny"
    """A local Hugging Face directory, or ``dummy:<preset>`` (random weights, no files)."""
    dtype: str | torch.dtype = "auto"
    """Weights and KV cache dtype: "auto" (the checkpoint's; float32 for dummy models on
    CPU), "float32", "bfloat16" or "float16"."""
    device: str = "cpu"
    """"cpu", "cuda" or "cuda:<index>"."""
    seed: int = 0
    """Seed of dummy weights and of requests without their own seed."""
    policy: str = "chunked_prefill"
    """"chunked_prefill" (Sarathi-Serve, vLLM v1's default: decodes first, prefill chunks
    fill the token budget, so running decodes never wait for a whole arriving prefill) or
    "continuous_batching" (vLLM v0: whole prefill steps first). Chunked prefill is the
    default: on CPU under load it had lower TTFT and TPOT at every rate measured
    (``bench/results/policy_cpu.json``)."""
    block_size: int = 16
    """Tokens per KV block: 8, 16 or 32."""
    kv_cache_memory_bytes: int = 1 * GiB
    """CPU: bytes of the KV pool (checked against the available RAM)."""
    gpu_memory_utilization: float = 0.9
    """GPU: fraction of device memory for weights + activations + KV cache, in (0, 1]."""
    watermark: float = 0.01
    """Fraction of KV blocks kept free when admitting requests (running ones grow into it)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks an earlier request with the same tokens already computed
    (vLLM's automatic prefix caching): a prompt that starts like a recent one prefills only
    the rest. Colocated engines, prefill instances and decode instances (these pull only the
    blocks they lack; DisaggConfig.decode_prefix_caching); on by default, as in vLLM. The
    output tokens are the same either way."""
    max_num_seqs: int = 256
    """Requests holding KV at once at most (the decode batch size limit)."""
    max_num_batched_tokens: int | None = None
    """Tokens per step at most. Default: max(max_model_len, 2048) for continuous batching
    (a whole prompt must fit a step), 512 for chunked prefill (the chunk budget)."""
    max_model_len: int | None = None
    """Context length (prompt + output). Default: the model's max_position_embeddings."""
    tensor_parallel_size: int = 1
    """Devices (CPU: processes) one instance shards each layer over; must divide the
    model's attention and key/value head counts. > 1 runs one worker process per rank."""
    pipeline_parallel_size: int = 1
    """Pipeline stages of one instance (at most the model's layer count), each in its own
    process(es); the engine keeps this many batches in flight (virtual engines)."""
    data_parallel_size: int = 1
    """Colocated replicas behind one server (vLLM's name), each a whole TP x PP engine in its
    own process on its own devices (CPU: its own cores; GPU: the next tp x pp GPUs); each
    request goes to the replica with the fewest unfinished requests."""
    log_stats_interval_s: float = 10.0
    """Seconds between the one-line stats logs; 0 disables them."""
    tokenizer: str | None = None
    """The tokenizer's local directory or cached hub id, when not the model's (default: the
    model's)."""
    revision: str | None = None
    """The branch, tag or commit hash of a hub-id model in the local Hugging Face cache
    (default: main); nothing is downloaded."""
    tokenizer_revision: str | None = None
    """As revision, for a hub-id tokenizer (default: main)."""
    trust_remote_code: bool = False
    """Accepted for vLLM compatibility; custom modeling code is never run: a checkpoint
    whose architecture needs it is refused."""
    chat_template: str | None = None
    """A Jinja chat template, inline or the path of a file holding one, replacing the
    tokenizer's."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty str, got {self.model!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        if isinstance(self.dtype, str) and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if not isinstance(self.dtype, str) and self.dtype not in _float_dtypes():
            raise ValueError(f"dtype must be one of {DTYPE_NAMES} or {_float_dtypes()}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {sorted(POLICY_NAMES)}, got {self.policy!r}")
        if self.block_size not in ALLOWED_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ValueError(
                f"block_size must be one of {ALLOWED_BLOCK_SIZES}, got {self.block_size!r}"
            )
        check_range("seed", self.seed, low=0, integer=True)
        check_range("kv_cache_memory_bytes", self.kv_cache_memory_bytes, low=1, integer=True)
        check_range("max_num_seqs", self.max_num_seqs, low=1, integer=True)
        for name in ("max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low=1, integer=True)
        check_range(
            "gpu_memory_utilization", self.gpu_memory_utilization, low=0, high=1, low_open=True
        )
        check_range("watermark", self.watermark, low=0, high=1, high_open=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}"
            )
        check_range(
            "log_stats_interval_s", self.log_stats_interval_s, low=0, high=math.inf,
            high_open=True, unit="seconds",
        )  # fmt: skip
        for name in ("tokenizer", "revision", "tokenizer_revision", "chat_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty str or None, got {value!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(
                f"trust_remote_code must be True or False, got {self.trust_remote_code!r}"
            )
        # Checks against the model (heads, layers) and the machine (devices) run when the
        # executor starts (`worker.multiproc_executor`), before any process is spawned.
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            check_range(name, getattr(self, name), low=1, integer=True)

    @property
    def parallelism(self) -> Parallelism:
        """``Parallelism(tensor_parallel_size, pipeline_parallel_size)``."""
        return Parallelism(self.tensor_parallel_size, self.pipeline_parallel_size)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        """Resolves the defaults that depend on the model (its context length)."""
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings "
                f"({model_max_len})"
            )
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 512 if self.policy == "chunked_prefill" else max(max_model_len, 2048)
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
        )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _float_dtypes() -> tuple:
    """The torch dtypes a model may run in (torch is loaded by whoever passed one)."""
    from distserve_rt.ops._checks import FLOAT_DTYPES

    return FLOAT_DTYPES

"""Engine flags of `drt-run serve` (and later `drt-run bench --backend local`), and
`build_engine_client(args)`, which turns them into the `EngineClient` the server serves.

The engine is `distserve_rt.engine.async_llm.AsyncLLM`, imported lazily (it lands with the
disaggregated runtime). The contract it must meet::

    AsyncLLM.from_engine_args(args: argparse.Namespace) -> AsyncLLM   # an EngineClient

where ``args`` carries the flags below plus, already validated by `build_engine_client`:

- ``args.engine_kwargs``: `EngineConfig` keyword arguments (``EngineConfig(**kwargs)``);
- ``args.placement_file``: the `PlacementFile` of ``--placement`` (None: one colocated
  instance with ``--policy``).

and it should have ``shutdown()``, which `drt-run serve` calls when uvicorn exits.
"""

from __future__ import annotations

import argparse
from typing import Any

from distserve_rt.core.scheduler import POLICIES
from distserve_rt.engine.protocol import EngineClient
from distserve_rt.planner.placement_file import load_placement

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MODEL = "dummy:llama-tiny"

# flag dest -> EngineConfig field (the same name today; kept explicit so a renamed flag
# cannot silently stop reaching the engine).
_ENGINE_FIELDS = (
    "model",
    "dtype",
    "device",
    "seed",
    "policy",
    "block_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "tensor_parallel_size",
    "pipeline_parallel_size",
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags of `EngineConfig` a server needs, plus ``--placement``; defaults are
    EngineConfig's (see its field docs for the details)."""
    # A group passed in (drt-run bench) is used as is: argparse deprecates nested groups.
    g = p if isinstance(p, argparse._ArgumentGroup) else p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="local HF model directory, or dummy:<preset> (random weights, no "
        f"files) (default: {DEFAULT_MODEL}; with drt-run bench --base-url: the server's)",
    )
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and KV dtype")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (default: cpu)")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of dummy weights and of requests without their own seed",
    )
    g.add_argument(
        "--placement",
        metavar="YAML",
        default=None,
        help="placement file written by `drt-run plan` (prefill/decode instances "
        "and their TP/PP); default: one colocated instance",
    )
    _add_capacity_args(g)


def _add_capacity_args(g) -> None:
    g.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="continuous_batching",
        help="scheduling policy of a colocated instance",
    )
    g.add_argument(
        "--block-size", type=int, choices=(8, 16, 32), default=16, help="tokens per KV block"
    )
    g.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="context length (prompt + output); default: the model's",
    )
    g.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=256,
        help="requests holding KV at once per instance",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=None,
        help="tokens per step at most (prefill budget L_m)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="GPU: fraction of device memory the engine may use",
    )
    g.add_argument(
        "--kv-cache-memory-bytes",
        type=positive_int,
        default=1 << 30,
        help="CPU: bytes of the KV pool",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=1,
        help="TP degree of a colocated instance (placement files set their own)",
    )
    g.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=positive_int,
        default=1,
        help="PP degree of a colocated instance",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` keyword arguments from the parsed flags."""
    kwargs = {name: getattr(args, name) for name in _ENGINE_FIELDS}
    kwargs["model"] = kwargs["model"] or DEFAULT_MODEL
    return kwargs


def build_engine_client(args: argparse.Namespace) -> EngineClient:
    """The engine for `drt-run serve` (see the module docstring for the contract).

    Raises ValueError for a bad placement file, and NotImplementedError while AsyncLLM
    does not exist yet (never a silent substitute engine)."""
    args.engine_kwargs = engine_kwargs(args)
    args.placement_file = load_placement(args.placement) if args.placement else None
    try:
        from distserve_rt.engine.async_llm import AsyncLLM
    except ModuleNotFoundError as exc:
        if exc.name != "distserve_rt.engine.async_llm":
            raise  # a dependency of AsyncLLM is missing: that error is the useful one
        raise NotImplementedError(
            "drt-run serve needs distserve_rt.engine.async_llm.AsyncLLM, which lands with "
            "the disaggregated runtime; it is not in this build"
        ) from exc
    engine = AsyncLLM.from_engine_args(args)
    if not isinstance(engine, EngineClient):
        raise TypeError(
            f"AsyncLLM.from_engine_args returned {type(engine).__name__}, "
            "which does not implement EngineClient"
        )
    return engine

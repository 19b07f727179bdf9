"""The cluster a placement is searched for, and how instances are built on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.instance_timing import (
    ACTIVATION_RESERVE_BYTES,
    Link,
    PipelineTiming,
    distserve_kv_capacity,
    kv_capacity_tokens,
)
from distserve_rt.planner.profiles import ProfileSet
from distserve_rt.planner.simulator import SimInstanceSpec

GIB = 1024**3


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes of identical devices. Bandwidths are per device, one direction, GB/s (1e9 B/s)."""

    num_nodes: int = 1
    devices_per_node: int = 8
    device_memory_gib: float = 80.0
    intra_node_gbps: float = 300.0
    """NVLink (A100: 300 GB/s each way)."""
    inter_node_gbps: float = 25.0
    """Network per device (one 200 Gb/s NIC per GPU = 25 GB/s)."""
    link_latency_s: float = 5e-6
    memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for key in ("num_nodes", "devices_per_node"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        for key in ("device_memory_gib", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(
                f"memory_utilization must be in (0, 1], got {self.memory_utilization!r}"
            )

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def intra_link(self) -> Link:
        return Link(self.intra_node_gbps * 1e9, self.link_latency_s)

    @property
    def inter_link(self) -> Link:
        return Link(self.inter_node_gbps * 1e9, self.link_latency_s)

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class DoesNotFitError(ValueError):
    """A model's weights leave no memory for KV cache on the devices of an instance."""


# Bytes per element of the dtypes a plan may assume for weights and KV.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def resolve_dtype(dtype: str | None, profile: ProfileSet) -> str:
    """The dtype a plan is for: ``dtype`` if given, else the one the profile was measured
    in (its step times are that dtype's), else bfloat16."""
    if dtype is None or dtype == "auto":
        measured = str(profile.measurement.get("dtype", "")).removeprefix("torch.")
        dtype = measured if measured in DTYPE_BYTES else "bfloat16"
    dtype_bytes(dtype)  # refuses an unknown name
    return dtype


def weights_do_not_fit(
    model: ModelConfig, parallelism: Parallelism, cluster: ClusterSpec, dtype: str = "bfloat16"
) -> str:
    """Why ``model`` leaves no KV room on a ``parallelism`` instance, in the user's terms:
    weights per device against the memory they may use, and how many devices would hold them.
    """
    weights = model.weight_bytes(dtype_bytes(dtype)) / GIB
    per_device = weights / parallelism.world_size
    usable = cluster.memory_utilization * cluster.device_memory_gib
    free = usable - ACTIVATION_RESERVE_BYTES / GIB
    least = f"; they need {math.ceil(weights / free)} devices at least" if free > 0 else ""
    return (
        f"{per_device:.0f} GiB of weights per device, {cluster.device_memory_gib:g} GiB of "
        f"memory ({free:.0f} GiB for weights and KV: {cluster.memory_utilization:.0%} of it "
        f"less {ACTIVATION_RESERVE_BYTES / GIB:g} GiB for activations){least}"
    )


def kv_capacity(
    model: ModelConfig,
    parallelism: Parallelism,
    cluster: ClusterSpec,
    hardware: str,
    dtype: str = "bfloat16",
) -> int:
    """KV tokens of a ``parallelism`` instance with ``dtype`` weights and KV: DistServe's
    table on its own A100-80GB fp16 setting (so our numbers match its simulator), the
    weights-left-over formula otherwise."""
    if hardware == "a100-80g" and cluster.device_memory_gib == 80.0 and dtype_bytes(dtype) == 2:
        got = distserve_kv_capacity(model.name, parallelism)
        if got is not None:
            return got
    return kv_capacity_tokens(
        model,
        parallelism,
        cluster.device_memory_gib * GIB,
        memory_utilization=cluster.memory_utilization,
        dtype_bytes=dtype_bytes(dtype),
    )


def infeasibility(
    model: ModelConfig,
    parallelism: Parallelism,
    cluster: ClusterSpec,
    hardware: str,
    max_seq_len: int,
    max_tp: int | None = None,
    dtype: str = "bfloat16",
) -> list[str]:
    """Why a ``parallelism`` instance cannot run ``model`` on ``cluster``; empty when it can."""
    reasons = []
    tp, pp = parallelism.tp_size, parallelism.pp_size
    max_tp = cluster.devices_per_node if max_tp is None else max_tp
    if model.num_heads % tp:
        reasons.append(f"tp={tp} does not divide num_heads={model.num_heads}")
    if model.num_layers % pp:
        reasons.append(f"pp={pp} does not divide num_layers={model.num_layers}")
    if tp > max_tp:
        reasons.append(f"tp={tp} exceeds {max_tp} devices per node (TP stays inside a node)")
    if parallelism.world_size > cluster.num_devices:
        reasons.append(
            f"tp*pp={parallelism.world_size} exceeds the cluster's {cluster.num_devices} devices"
        )
    if not reasons:
        cap = kv_capacity(model, parallelism, cluster, hardware, dtype)
        if cap <= 0:
            why = weights_do_not_fit(model, parallelism, cluster, dtype)
            reasons.append(f"weights do not fit: {why}")
        elif cap < max_seq_len:
            reasons.append(
                f"weights + KV do not fit: {cap} KV tokens free, the longest request needs "
                f"{max_seq_len}"
            )
    return reasons


def build_instance(
    model: ModelConfig,
    parallelism: Parallelism,
    *,
    cluster: ClusterSpec,
    profile: ProfileSet,
    stage_link: Link,
    max_batch_tokens: int,
    max_num_seqs: int = 256,
    dtype: str = "bfloat16",
) -> SimInstanceSpec:
    """A SimInstanceSpec of ``model`` on ``parallelism.world_size`` devices of ``cluster``;
    ``stage_link`` joins its pipeline stages (unused when ``pp_size == 1``).

    Raises DoesNotFitError (a ValueError) when the weights leave no room for KV cache."""
    capacity = kv_capacity(model, parallelism, cluster, profile.hardware, dtype)
    if capacity <= 0:
        raise DoesNotFitError(
            f"{model.name} does not fit tp={parallelism.tp_size}, pp={parallelism.pp_size}: "
            f"{weights_do_not_fit(model, parallelism, cluster, dtype)}"
        )
    pp = parallelism.pp_size
    pipeline = PipelineTiming(pp, model.hidden_size, stage_link if pp > 1 else None)
    return SimInstanceSpec(
        latency=profile.latency_model(model, parallelism.tp_size, dtype=dtype),
        kv_capacity_tokens=capacity,
        parallelism=parallelism,
        pipeline=pipeline,
        max_batch_tokens=max_batch_tokens,
        max_num_seqs=max_num_seqs,
    )


def divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]

"""Instance-level timing: pipeline stages, inter-stage hops, KV transfer, KV capacity.

Pipeline parallelism (PP = k stages, layers split evenly): a batch spends ``t/k`` on each
stage (``t`` = the TP latency model's whole-model time) and pays one *hop* between stages:
``hop_latency_s + activation bytes / link bandwidth`` with activation bytes =
tokens × hidden × dtype bytes. DistServe's simulator uses ``t/pp + pp`` ms for prefill and
``t/pp`` for decode, a fixed 1 ms per stage whatever the batch or the link; ours scales with
the tokens moved and the link they cross (NVLink inside a node, the network across nodes),
which matters for the low-node-affinity placements that put stages on different nodes.

KV transfer (prefill → decode): ``latency + bytes / (bandwidth × streams)`` with bytes =
prompt tokens × `ModelConfig.kv_bytes_per_token`. Each device of the smaller instance moves
its own slice of heads/layers over its own link, so ``streams = min(devices of both)``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.models.config import ModelConfig
from distserve_rt.workloads.datasets import data_path


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link of one device: bandwidth in bytes/s, latency in s."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(
                f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s!r}"
            )
        if not self.latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s!r}")

    def transfer_s(self, num_bytes: float, num_streams: int = 1) -> float:
        return self.latency_s + num_bytes / (self.bandwidth_bytes_per_s * num_streams)


NVLINK_A100 = Link(300e9, 5e-6)
"""A100 NVLink 3: 600 GB/s bidirectional, 300 GB/s each way."""
INFINIBAND_200G = Link(25e9, 5e-6)
"""One 200 Gb/s HDR NIC per GPU (DGX A100)."""


@dataclass(frozen=True, slots=True)
class PipelineTiming:
    """Inter-stage hops of a PP instance; ``pp == 1`` has none."""

    pp: int = 1
    hidden_size: int = 0
    link: Link | None = None
    """Link between consecutive stages; None only when pp == 1."""
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"pp must be a positive int, got {self.pp!r}")
        if self.pp > 1 and (self.link is None or self.hidden_size < 1):
            raise ValueError(f"pp={self.pp} needs a link and hidden_size between stages")

    def hop_s(self, num_tokens: int) -> float:
        """One stage-to-stage hop of ``num_tokens`` activations (0 when pp == 1)."""
        if self.pp == 1:
            return 0.0
        return self.link.transfer_s(num_tokens * self.hidden_size * self.dtype_bytes)


def kv_transfer_s(
    model: ModelConfig, num_tokens: int, link: Link, num_streams: int, dtype_bytes: int = 2
) -> float:
    """Seconds to move ``num_tokens`` tokens of KV cache (all layers) over ``num_streams`` links."""
    return link.transfer_s(num_tokens * model.kv_bytes_per_token(dtype_bytes), num_streams)


@lru_cache(maxsize=1)
def _distserve_capacity_table() -> dict[tuple[str, Parallelism], int]:
    with data_path("distserve_max_num_tokens.csv").open() as f:
        return {
            (r["model"].split("/")[-1], Parallelism(int(r["tp"]), int(r["pp"]))): int(
                r["max_num_tokens"]
            )
            for r in csv.DictReader(f)
        }


def distserve_kv_capacity(model_name: str, parallelism: Parallelism) -> int | None:
    """DistServe's A100-80GB KV capacity (tokens) of a ``parallelism`` instance of
    ``model_name``, or None if its table does not list them."""
    return _distserve_capacity_table().get((model_name, parallelism))


ACTIVATION_RESERVE_BYTES = 2 * 1024**3
"""Memory per device kept for activations and workspace, not weights or KV."""


def kv_capacity_tokens(
    model: ModelConfig,
    parallelism: Parallelism,
    device_memory_bytes: float,
    *,
    memory_utilization: float = 0.9,
    activation_reserve_bytes: float = ACTIVATION_RESERVE_BYTES,
    dtype_bytes: int = 2,
) -> int:
    """KV tokens an instance of ``parallelism.world_size`` devices holds: what the weights
    leave free.

    Per device: ``utilization × memory − weights/world_size − activation reserve``; the
    instance holds ``world_size`` times that over ``kv_bytes_per_token``. Can be ≤ 0 (does
    not fit). Assumes weights split evenly (embeddings included), like the runtime's TP/PP
    sharding, so only the product of TP and PP matters.
    """
    num_devices = parallelism.world_size
    free = memory_utilization * device_memory_bytes - model.weight_bytes(dtype_bytes) / num_devices
    free -= activation_reserve_bytes
    return math.floor(free * num_devices / model.kv_bytes_per_token(dtype_bytes))

"""`DisaggConfig`: the knobs of the disaggregated runtime (transport, KV leases, recovery,
pinning, start-up), and `LeaseExpiryAction`. Validated at construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from distserve_rt.config.validation import check_range


class LeaseExpiryAction(enum.Enum):
    FAIL = "fail"
    """The request ends with finish_reason "error" saying the KV was not pulled in time."""
    RETRY = "retry"
    """The request is prefilled again (prompt + generated tokens) on a prefill instance."""


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    """Knobs of the disaggregated runtime (the instances' engine settings come from
    `EngineConfig`; its max_num_batched_tokens is the prefill budget L_m)."""

    transport: str = "auto"
    """KV transport: "auto" (shm on CPU, cuda_ipc on GPU; launcher="ray": per pair, shm when
    both ends share a node, nixl otherwise), "shm", "cuda_ipc", "nixl" (NIXL
    READ over UCX: between machines; CPU pools for now), or "fake" (tests: in-process pools,
    so only with launcher="thread" and TP = PP = 1 instances)."""
    kv_lease_timeout_s: float = 30.0
    """Seconds a finished prefill's KV may wait for a decode instance to pull it."""
    on_lease_expiry: LeaseExpiryAction = LeaseExpiryAction.FAIL
    retry_on_instance_failure: bool = False
    """Re-prefill the requests of a dead instance on a live one (else they end in error)."""
    max_retries: int = 1
    """Times one request may be re-prefilled (lease expiry or instance death)."""
    pin_cpus: bool = True
    """CPU: pin each instance to its own cores (PhaseConfig.cpu_cores). GPU instances are
    not pinned."""
    share_gpus: bool = False
    """GPU: let instances share GPUs (round-robin, `Placement.gpu_groups`) instead of one
    GPU per instance rank: disaggregation on fewer GPUs, e.g. 1P1D on one GPU, for small
    models or tests. Then gpu_memory_utilization is each instance's own share of a GPU
    (weights, activations and KV cache of that instance, sized without counting the other
    instances' memory), and the instances sharing a GPU must fit together: start-up
    refuses gpu_memory_utilization x (instance ranks on one GPU) > 1, so 1P1D on one GPU
    needs gpu_memory_utilization <= 0.5."""
    startup_timeout_s: float = 300.0
    """Seconds for every instance to load its model and report ready."""
    launcher: str = "process"
    """"process" (spawn, one per instance), "ray" (one Ray actor per instance, placed on a
    Ray cluster: engine/disagg/ray_launcher.py) or "thread" (tests: no isolation, no
    pinning)."""
    ray_address: str | None = None
    """launcher="ray": the cluster to join (``host:port`` of the head; None: "auto", the
    cluster this machine's `ray start` joined)."""
    placement_timeout_s: float = 60.0
    """launcher="ray": seconds to wait for the cluster to reserve an instance's devices
    (a placement group the cluster cannot hold would wait forever)."""
    instance_nodes: tuple[int | tuple[int, ...], ...] | None = None
    """launcher="ray": the node index (cluster order: head first, then by IP) of each
    instance, prefill instances first; a placement file's ``nodes``. An entry may instead
    list one node per PP stage (an instance spanning nodes; a stage's TP ranks share its
    node). None: each instance on the first node with room for it, or, when no node has,
    its stages on the first nodes with room for one stage each."""
    stats_interval_s: float = 0.05
    """Seconds between the instances' load reports."""
    decode_prefix_caching: bool = True
    """Decode instances keep finished requests' KV as a prefix cache (with
    EngineConfig.enable_prefix_caching): a migration pulls only the blocks its decode
    instance lacks, and the controller routes a request to the decode instance holding the
    longest prefix of it."""
    max_decode_load_imbalance: int = 4
    """Cache-aware routing: a decode instance is chosen for its cached prefix only while it
    has at most this many more requests than the least loaded one (0: least loaded only).
    Data-parallel replicas (`DataParallelCore`) are routed by the same rule and cap."""
    local_prefill_max_tokens: int = 0
    """Conditional disaggregation: prefill on the decode instance when the part of the prompt
    it lacks is at most this many tokens (0: off, the default: not yet shown to pay)."""
    local_prefill_min_queue_tokens: int = 0
    """Conditional disaggregation: prefill on the decode instance when the least loaded
    prefill instance has at least this many prompt tokens queued (0: off)."""

    def __post_init__(self) -> None:
        if self.transport not in ("auto", "shm", "cuda_ipc", "nixl", "fake"):
            raise ValueError(
                "transport must be 'auto', 'shm', 'cuda_ipc', 'nixl' or 'fake', got "
                f"{self.transport!r}"
            )
        if isinstance(self.on_lease_expiry, str):
            try:
                object.__setattr__(self, "on_lease_expiry", LeaseExpiryAction(self.on_lease_expiry))
            except ValueError:
                raise ValueError(
                    f"on_lease_expiry must be 'fail' or 'retry', got {self.on_lease_expiry!r}"
                ) from None
        for name in ("kv_lease_timeout_s", "startup_timeout_s", "stats_interval_s"):
            check_range(name, getattr(self, name), low=0, low_open=True, unit="seconds")
        check_range("max_retries", self.max_retries, low=0, integer=True)
        for name in (
            "max_decode_load_imbalance", "local_prefill_max_tokens",
            "local_prefill_min_queue_tokens",
        ):  # fmt: skip
            check_range(name, getattr(self, name), low=0, integer=True)
        if not isinstance(self.decode_prefix_caching, bool):
            raise ValueError(
                f"decode_prefix_caching must be True or False, got {self.decode_prefix_caching!r}"
            )
        if not isinstance(self.share_gpus, bool):
            raise ValueError(f"share_gpus must be a bool, got {self.share_gpus!r}")
        if self.launcher not in ("process", "thread", "ray"):
            raise ValueError(
                f"launcher must be 'process', 'thread' or 'ray', got {self.launcher!r}"
            )
        check_range("placement_timeout_s", self.placement_timeout_s, low=0, low_open=True,
                    unit="seconds")  # fmt: skip
        if self.instance_nodes is not None:
            nodes = tuple(
                n if isinstance(n, int) else tuple(n) if isinstance(n, (list, tuple)) else n
                for n in self.instance_nodes
            )
            if not all(_is_node(n) or (isinstance(n, tuple) and n and all(map(_is_node, n)))
                       for n in nodes):  # fmt: skip
                raise ValueError(
                    "instance_nodes must give each instance a node index (int >= 0) or a "
                    f"list of them, one per PP stage; got {self.instance_nodes!r}"
                )
            object.__setattr__(self, "instance_nodes", nodes)

    def transport_name(self, device: str) -> str:
        if self.transport != "auto":
            return self.transport
        return "shm" if device == "cpu" else "cuda_ipc"


def _is_node(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0

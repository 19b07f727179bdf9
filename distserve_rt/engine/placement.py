"""Where the phases run: `Placement` (colocated, or disaggregated prefill/decode instances)
and `DisaggConfig` (the knobs of the disaggregated runtime).

From Python objects, CLI flags (`entrypoints.engine_args`: ``--placement`` and the per-phase
and DisaggConfig flags) or the YAML file `drt-run plan` writes (`Placement.from_file`).
Validated at construction; TP x PP sizes that do not fit the model are rejected by
`Placement.check_supported` at start-up (the controller knows the model then)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from distserve_rt.distributed.parallel_state import check_parallel_sizes
from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.placement_file import PhasePlacement, PlacementFile, load_placement


class PlacementKind(enum.Enum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


class LeaseExpiryAction(enum.Enum):
    FAIL = "fail"
    """The request ends with finish_reason "error" saying the KV was not pulled in time."""
    RETRY = "retry"
    """The request is prefilled again (prompt + generated tokens) on a prefill instance."""


@dataclass(frozen=True, slots=True)
class PhaseConfig:
    """One phase's instances."""

    tp: int = 1
    """Tensor-parallel devices per instance."""
    pp: int = 1
    """Pipeline stages per instance."""
    num_instances: int = 1
    cpu_cores: int = 1
    """CPU: cores each instance is pinned to (disjoint between instances)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "num_instances", "cpu_cores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class Placement:
    """Colocated (one instance does both phases) or disaggregated (xPyD)."""

    kind: PlacementKind = PlacementKind.COLOCATED
    prefill: PhaseConfig | None = None
    decode: PhaseConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PlacementKind):
            raise ValueError(f"kind must be a PlacementKind, got {self.kind!r}")
        disagg = self.kind is PlacementKind.DISAGGREGATED
        if disagg != (self.prefill is not None and self.decode is not None):
            raise ValueError(
                "a disaggregated placement needs prefill and decode PhaseConfigs, a colocated "
                f"one neither (kind={self.kind.value}, prefill={self.prefill}, "
                f"decode={self.decode})"
            )

    @classmethod
    def colocated(cls) -> Placement:
        return cls()

    @classmethod
    def disaggregated(
        cls, prefill: PhaseConfig | None = None, decode: PhaseConfig | None = None
    ) -> Placement:
        """Defaults: 1 prefill + 1 decode instance, TP = PP = 1, one core each."""
        return cls(PlacementKind.DISAGGREGATED, prefill or PhaseConfig(), decode or PhaseConfig())

    @classmethod
    def parse(cls, value: str | Placement | None) -> Placement:
        """A Placement, "colocated", "disaggregated" (1P1D) or a placement YAML path."""
        if value is None or isinstance(value, Placement):
            return value or cls()
        if value == PlacementKind.COLOCATED.value:
            return cls()
        if value == PlacementKind.DISAGGREGATED.value:
            return cls.disaggregated()
        if isinstance(value, str) and Path(value).suffix in (".yaml", ".yml"):
            return cls.from_file(value)
        raise ValueError(
            f"placement must be 'colocated', 'disaggregated' or a placement .yaml file, "
            f"got {value!r}"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Placement:
        return cls.from_placement_file(load_placement(path))

    @classmethod
    def from_placement_file(cls, pf: PlacementFile) -> Placement:
        if pf.placement == PlacementKind.COLOCATED.value:
            return cls()

        def phase(p: PhasePlacement | None) -> PhaseConfig:
            assert p is not None  # PlacementFile checked it for disaggregated placements
            return PhaseConfig(tp=p.tp, pp=p.pp, num_instances=p.num_instances)

        return cls.disaggregated(phase(pf.prefill), phase(pf.decode))

    @property
    def is_disaggregated(self) -> bool:
        return self.kind is PlacementKind.DISAGGREGATED

    @property
    def max_num_ranks(self) -> int:
        """Worker processes of the largest instance (1: every instance runs in-process)."""
        phases = [p for p in (self.prefill, self.decode) if p is not None]
        return max((p.tp * p.pp for p in phases), default=1)

    def check_supported(self, model_config: ModelConfig) -> None:
        """Start-up check of each phase's TP x PP against the model (ValueError naming the
        phase, the sizes and the rule).

        Any (prefill tp, pp) -> (decode tp, pp) pair runs when both instances fit the model
        (`check_parallel_sizes`: TP divides the attention and the KV head counts, PP does not
        exceed the layer count): the decode ranks re-slice the KV by heads and layers
        (`transfer.plan_kv_pulls`), decode TP may be smaller or larger than prefill TP and
        either phase may use PP (tests/e2e/test_disagg_parallel.py).
        """
        if not self.is_disaggregated:
            return
        assert self.prefill is not None and self.decode is not None
        mc = model_config
        for name, phase in (("prefill", self.prefill), ("decode", self.decode)):
            try:
                check_parallel_sizes(
                    mc.num_heads, mc.num_kv_heads, mc.num_layers, phase.tp, phase.pp
                )
            except ValueError as exc:
                raise ValueError(
                    f"{name} instances (tp={phase.tp}, pp={phase.pp}) do not fit model "
                    f"{mc.name!r} ({mc.num_heads} heads, {mc.num_kv_heads} KV heads, "
                    f"{mc.num_layers} layers): {exc}"
                ) from None

    def cpu_core_groups(self, available: list[int] | None = None) -> list[tuple[int, ...]]:
        """Disjoint core groups: prefill instances first, then decode instances. Raises
        ValueError when the cores this process may use do not suffice."""
        assert self.prefill is not None and self.decode is not None
        cores = sorted(os.sched_getaffinity(0)) if available is None else list(available)
        sizes = [self.prefill.cpu_cores] * self.prefill.num_instances
        sizes += [self.decode.cpu_cores] * self.decode.num_instances
        if sum(sizes) > len(cores):
            raise ValueError(
                f"the placement pins {len(sizes)} instances to {sum(sizes)} CPU cores but only "
                f"{len(cores)} are available ({cores}); lower num_instances or cpu_cores, or "
                "set DisaggConfig(pin_cpus=False) to share cores"
            )
        groups, start = [], 0
        for size in sizes:
            groups.append(tuple(cores[start : start + size]))
            start += size
        return groups

    def gpu_groups(self, num_gpus: int, share: bool = False) -> list[tuple[int, ...]]:
        """GPU indices per instance: prefill instances first, then decode instances; an
        instance's ``tp * pp`` ranks get consecutive indices (rank r: the group's first + r,
        as `distributed.launch.LaunchConfig` numbers them).

        Without `share` every rank has a GPU of its own; ValueError when `num_gpus` are too
        few. With `share` the groups go round-robin over the GPUs (a group that would run
        past the last GPU starts again at GPU 0), so several instances may use one GPU; the
        ranks of one instance still need distinct GPUs (NCCL refuses two ranks of a
        communicator on one device): ValueError when an instance has more ranks than GPUs.
        """
        assert self.prefill is not None and self.decode is not None
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
            raise ValueError(f"num_gpus must be an int >= 1, got {num_gpus!r}")
        sizes = [self.prefill.tp * self.prefill.pp] * self.prefill.num_instances
        sizes += [self.decode.tp * self.decode.pp] * self.decode.num_instances
        if not share and sum(sizes) > num_gpus:
            raise ValueError(
                f"the placement ({self.describe()}) needs {sum(sizes)} GPUs, one per instance "
                f"rank, but {num_gpus} are visible (torch.cuda.device_count()); lower "
                "num_instances/tp/pp, or set DisaggConfig(share_gpus=True) to let instances "
                "share GPUs"
            )
        if share and max(sizes) > num_gpus:
            raise ValueError(
                f"the placement ({self.describe()}) has an instance of {max(sizes)} ranks, "
                f"which need distinct GPUs even with share_gpus=True, but {num_gpus} are "
                "visible (torch.cuda.device_count()); lower tp/pp"
            )
        groups, start = [], 0
        for size in sizes:
            if start + size > num_gpus:
                start = 0
            groups.append(tuple(range(start, start + size)))
            start = (start + size) % num_gpus
        return groups

    def describe(self) -> str:
        """E.g. "1 prefill x (tp=1, pp=1) + 2 decode x (tp=2, pp=1)"."""
        if not self.is_disaggregated:
            return self.kind.value
        assert self.prefill is not None and self.decode is not None
        return " + ".join(
            f"{p.num_instances} {name} x (tp={p.tp}, pp={p.pp})"
            for name, p in (("prefill", self.prefill), ("decode", self.decode))
        )


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    """Knobs of the disaggregated runtime (the instances' engine settings come from
    `EngineConfig`; its max_num_batched_tokens is the prefill budget L_m)."""

    transport: str = "auto"
    """KV transport: "auto" (shm on CPU, cuda_ipc on GPU), "shm", "cuda_ipc"."""
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
    """"process" (spawn, one per instance) or "thread" (tests: no isolation, no pinning)."""
    debug_verify_kv: bool = False
    """Hash the KV blocks on both sides of every migration and fail on a mismatch."""
    debug_pull_delay_s: float = 0.0
    """Decode instances start pulling only this many seconds after they are ready (tests
    of leases and back-pressure; ``math.inf``: never)."""
    debug_min_pull_s: float = 0.0
    """Every KV pull is reported done no sooner than this many seconds after it was
    submitted (tests of a slow transfer: the copy itself is not slowed, only its end)."""
    stats_interval_s: float = 0.05
    """Seconds between the instances' load reports."""

    def __post_init__(self) -> None:
        if self.transport not in ("auto", "shm", "cuda_ipc"):
            raise ValueError(
                f"transport must be 'auto', 'shm' or 'cuda_ipc', got {self.transport!r}"
            )
        if isinstance(self.on_lease_expiry, str):
            try:
                object.__setattr__(self, "on_lease_expiry", LeaseExpiryAction(self.on_lease_expiry))
            except ValueError:
                raise ValueError(
                    f"on_lease_expiry must be 'fail' or 'retry', got {self.on_lease_expiry!r}"
                ) from None
        for name in ("debug_pull_delay_s", "debug_min_pull_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        for name in ("kv_lease_timeout_s", "startup_timeout_s", "stats_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if not isinstance(self.share_gpus, bool):
            raise ValueError(f"share_gpus must be a bool, got {self.share_gpus!r}")
        if self.launcher not in ("process", "thread"):
            raise ValueError(f"launcher must be 'process' or 'thread', got {self.launcher!r}")

    def transport_name(self, device: str) -> str:
        if self.transport != "auto":
            return self.transport
        return "shm" if device == "cpu" else "cuda_ipc"

"""Where the phases run: `Placement` (colocated, or disaggregated prefill/decode instances,
each phase's instances described by a `PhaseConfig`).

From Python objects, CLI flags (`entrypoints.engine_args`: ``--placement`` and the per-phase
flags) or the YAML file `drt-run plan` writes (`Placement.from_file`).
Validated at construction; TP x PP sizes that do not fit the model are rejected by
`Placement.check_supported` at start-up (the controller knows the model then)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distserve_rt.config.parallelism import Parallelism, check_parallel_sizes
from distserve_rt.config.validation import check_range
from distserve_rt.planner.placement_file import PhasePlacement, PlacementFile, load_placement

if TYPE_CHECKING:  # an annotation only: importing `models` would load every model class
    from distserve_rt.config.engine import EngineConfig
    from distserve_rt.models.config import ModelConfig


class PlacementKind(enum.Enum):
    """Where prefill and decode run (also the planner's candidate kinds)."""

    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


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
            check_range(name, getattr(self, name), low=1, integer=True)

    @property
    def parallelism(self) -> Parallelism:
        """``Parallelism(tp, pp)`` of each of the phase's instances."""
        return Parallelism(self.tp, self.pp)


@dataclass(frozen=True, slots=True)
class Placement:
    """Colocated (each instance does both phases) or disaggregated (xPyD)."""

    kind: PlacementKind = PlacementKind.COLOCATED
    prefill: PhaseConfig | None = None
    decode: PhaseConfig | None = None
    replicas: PhaseConfig | None = None
    """Colocated: the instances' TP x PP and count (data-parallel replicas), as a placement
    file gives them; None: as the `EngineConfig` says (`apply_to`)."""

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
        if disagg and self.replicas is not None:
            raise ValueError(
                f"replicas describes colocated instances; a disaggregated placement gives "
                f"num_instances per phase (got replicas={self.replicas})"
            )

    @classmethod
    def colocated(cls, replicas: PhaseConfig | None = None) -> Placement:
        """`replicas`: the colocated instances' TP x PP and count (None: EngineConfig's)."""
        return cls(replicas=replicas)

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
            p = pf.prefill  # a colocated file keeps its instances under prefill
            return cls.colocated(PhaseConfig(tp=p.tp, pp=p.pp, num_instances=p.num_instances))

        def phase(p: PhasePlacement | None) -> PhaseConfig:
            assert p is not None  # PlacementFile checked it for disaggregated placements
            return PhaseConfig(tp=p.tp, pp=p.pp, num_instances=p.num_instances)

        return cls.disaggregated(phase(pf.prefill), phase(pf.decode))

    def apply_to(self, config: EngineConfig) -> EngineConfig:
        """`config` running this placement: a colocated placement's `replicas` become its
        tensor/pipeline/data-parallel sizes. ValueError naming the setting when `config`
        sets one to another value than the placement (1 counts as unset), or sets
        data_parallel_size for a disaggregated placement (its phases have num_instances)."""
        if self.is_disaggregated:
            if config.data_parallel_size != 1:
                raise ValueError(
                    f"data_parallel_size={config.data_parallel_size} replicates colocated "
                    f"engines; the placement is disaggregated ({self.describe()}): set "
                    "num_instances per phase instead"
                )
            return config
        if self.replicas is None:
            return config
        r = self.replicas
        planned = {
            "tensor_parallel_size": r.tp,
            "pipeline_parallel_size": r.pp,
            "data_parallel_size": r.num_instances,
        }
        for name, value in planned.items():
            given = getattr(config, name)
            if given not in (1, value):
                raise ValueError(
                    f"{name}={given} but the placement runs {self.describe()}; drop the "
                    f"setting (or set it to {value}) or plan again with it"
                )
        return config.replace(**planned)

    @property
    def is_disaggregated(self) -> bool:
        return self.kind is PlacementKind.DISAGGREGATED

    @property
    def max_num_ranks(self) -> int:
        """Worker processes of the largest instance (1: every instance runs in-process)."""
        phases = [p for p in (self.prefill, self.decode) if p is not None]
        return max((p.parallelism.world_size for p in phases), default=1)

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
                par = phase.parallelism
                check_parallel_sizes(
                    mc.num_heads, mc.num_kv_heads, mc.num_layers, par.tp_size, par.pp_size
                )
            except ValueError as exc:
                raise ValueError(
                    f"{name} instances ({phase.parallelism}) do not fit model "
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
        check_range("num_gpus", num_gpus, low=1, integer=True)
        sizes = [self.prefill.parallelism.world_size] * self.prefill.num_instances
        sizes += [self.decode.parallelism.world_size] * self.decode.num_instances
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
        """E.g. "1 prefill x (tp=1, pp=1) + 2 decode x (tp=2, pp=1)", "2 x colocated (tp=8,
        pp=1)" (a placement file's replicas) or "colocated"."""
        if not self.is_disaggregated:
            r = self.replicas
            if r is None:
                return self.kind.value
            return f"{r.num_instances} x colocated ({r.parallelism})"
        assert self.prefill is not None and self.decode is not None
        return " + ".join(
            f"{p.num_instances} {name} x ({p.parallelism})"
            for name, p in (("prefill", self.prefill), ("decode", self.decode))
        )

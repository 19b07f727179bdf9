"""The placement file (YAML): what `drt-run plan` writes and `drt-run serve --placement` reads.

Schema::

    model: opt-13b                      # preset name or HF model path
    placement: disaggregated            # or colocated
    prefill: {tp: 2, pp: 1, num_instances: 2}
    decode:  {tp: 1, pp: 1, num_instances: 3}   # omitted/null when colocated
    cluster: {num_nodes: 1, devices_per_node: 8, ...}
    slo: {ttft_s: 0.25, tpot_s: 0.1, target: 0.9}
    engine: {max_num_batched_tokens: 512, max_num_seqs: 256, gpu_memory_utilization: 0.9}
    predicted: {...}                    # free-form: the planner's numbers

``engine`` holds the `EngineConfig` settings the plan assumed (the prefill batch budget L_m,
the batch size limit, the fraction of device memory for weights + KV), so `drt-run serve
--placement` runs what was planned: it applies them and refuses flags that contradict them
(`entrypoints.engine_args`). Files written before it existed lack it and still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

PLACEMENTS = ("disaggregated", "colocated")

# The `engine` keys a file may carry (EngineConfig's names; EngineConfig checks them fully
# when serve builds it, these checks only catch a file that is malformed).
ENGINE_INT_KEYS = ("max_num_batched_tokens", "max_num_seqs", "block_size")
ENGINE_KEYS = (*ENGINE_INT_KEYS, "gpu_memory_utilization", "dtype")


@dataclass(frozen=True)
class PhasePlacement:
    tp: int
    pp: int
    num_instances: int

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "num_instances"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp * self.num_instances


@dataclass(frozen=True)
class PlacementFile:
    model: str
    placement: str
    prefill: PhasePlacement
    decode: PhasePlacement | None
    cluster: dict = field(default_factory=dict)
    slo: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    """EngineConfig settings the plan assumed (keys from ENGINE_KEYS)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if (self.placement == "disaggregated") != (self.decode is not None):
            raise ValueError(
                f"decode must be given for a disaggregated placement and omitted for a "
                f"colocated one (placement={self.placement!r}, decode={self.decode!r})"
            )
        total = self.cluster.get("num_nodes", 0) * self.cluster.get("devices_per_node", 0)
        if total and self.num_devices > total:
            raise ValueError(f"placement uses {self.num_devices} devices, the cluster has {total}")
        _check_engine(self.engine)

    @property
    def num_devices(self) -> int:
        return self.prefill.num_devices + (self.decode.num_devices if self.decode else 0)

    def to_dict(self) -> dict:
        def phase(p):
            return None if p is None else {"tp": p.tp, "pp": p.pp, "num_instances": p.num_instances}

        return {
            "model": self.model,
            "placement": self.placement,
            "prefill": phase(self.prefill),
            "decode": phase(self.decode),
            "cluster": self.cluster,
            "slo": self.slo,
            "engine": self.engine,
            "predicted": self.predicted,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def _check_engine(engine: dict) -> None:
    if not isinstance(engine, dict):
        raise ValueError(f"engine must be a mapping of {ENGINE_KEYS}, got {engine!r}")
    unknown = set(engine) - set(ENGINE_KEYS)
    if unknown:
        raise ValueError(f"unknown engine keys {sorted(unknown)}; allowed: {list(ENGINE_KEYS)}")
    for key in ENGINE_INT_KEYS:
        value = engine.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"engine.{key} must be a positive int, got {value!r}")
    fraction = engine.get("gpu_memory_utilization", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {fraction!r}")
    if not isinstance(engine.get("dtype", ""), str):
        raise ValueError(f"engine.dtype must be a string, got {engine['dtype']!r}")


def _phase(raw, key: str) -> PhasePlacement | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"tp", "pp", "num_instances"}:
        raise ValueError(f"{key} must be a mapping with keys tp, pp, num_instances, got {raw!r}")
    return PhasePlacement(raw["tp"], raw["pp"], raw["num_instances"])


def placement_from_dict(raw: dict) -> PlacementFile:
    if not isinstance(raw, dict):
        raise ValueError(f"a placement file holds a mapping, got {type(raw).__name__}")
    keys = {"model", "placement", "prefill", "decode", "cluster", "slo", "engine", "predicted"}
    unknown = set(raw) - keys
    if unknown:
        raise ValueError(f"unknown keys in placement file: {sorted(unknown)}")
    for key in ("model", "placement", "prefill"):
        if key not in raw:
            raise ValueError(f"placement file lacks {key!r}")
    return PlacementFile(
        model=raw["model"],
        placement=raw["placement"],
        prefill=_phase(raw["prefill"], "prefill"),
        decode=_phase(raw.get("decode"), "decode"),
        cluster=raw.get("cluster") or {},
        slo=raw.get("slo") or {},
        predicted=raw.get("predicted") or {},
        engine=raw.get("engine") or {},
    )


def load_placement(path: str | Path) -> PlacementFile:
    """Read and validate a placement file; ValueError naming what is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read placement file {str(path)!r}: {exc}") from None
    return placement_from_dict(raw)

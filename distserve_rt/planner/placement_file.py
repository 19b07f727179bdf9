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
    nodes: {prefill: [0, 0], decode: [1, 1, 1]}  # node index of each instance (optional)
    # an instance may list one node per PP stage instead: prefill: [[0, 1]] (spans nodes);
    # aligned pairs: {prefill: [[0, 1]], decode: [[0, 1]]} (stage k of both on one node)
    disagg: {local_prefill_max_tokens: 0, ...}   # routing the plan simulated (optional)

``nodes`` says where each instance runs (node indices in the cluster's order: the Ray
head first, then by IP; `drt-run serve --launcher ray` places them there). An entry is the
node of the whole instance, or a list of one node per PP stage (the instance spans nodes;
each stage's TP ranks share its node). Plan writes it with `assign_nodes`: an Algorithm-2
answer whose pairs span ``s`` nodes is laid out "aligned" (DistServe's placement: each of
a pair group's ``s`` nodes holds the same layer segment of its prefill and its decode
instances, so their KV moves inside the node, over shm on Ray); otherwise whole instances
are packed, prefill instances first, and none is written when an instance is larger than
a node (serve then spreads that instance's stages over the first nodes with room).

``engine`` holds the `EngineConfig` settings the plan assumed (the prefill batch budget L_m,
the batch size limit, the fraction of device memory for weights + KV; a multi-turn plan
also whether the prefix cache is on), so `drt-run serve
--placement` runs what was planned: it applies them and refuses flags that contradict them
(`entrypoints.engine_args`). Files written before it existed lack it and still load.

``disagg`` holds the `DisaggConfig` routing settings a multi-turn disaggregated plan
simulated (decode-side prefix cache, load cap, conditional disaggregation thresholds): they
change what a deployment carries, so serve applies them and refuses flags that contradict
them, as for ``engine``. Other plans write none; files without it still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

PLACEMENTS = ("disaggregated", "colocated")

# The `engine` keys a file may carry (EngineConfig's names; EngineConfig checks them fully
# when serve builds it, these checks only catch a file that is malformed).
ENGINE_INT_KEYS = ("max_num_batched_tokens", "max_num_seqs", "block_size")
ENGINE_BOOL_KEYS = ("enable_prefix_caching",)  # a multi-turn plan counted on the cache
ENGINE_KEYS = (*ENGINE_INT_KEYS, *ENGINE_BOOL_KEYS, "gpu_memory_utilization", "dtype")

# The `disagg` keys (DisaggConfig's names): the routing rules the conversation simulator
# applies as the controller does, so a plan's numbers depend on them.
DISAGG_INT_KEYS = (
    "max_decode_load_imbalance", "local_prefill_max_tokens", "local_prefill_min_queue_tokens",
)  # fmt: skip
DISAGG_BOOL_KEYS = ("decode_prefix_caching",)
DISAGG_KEYS = (*DISAGG_BOOL_KEYS, *DISAGG_INT_KEYS)


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
    nodes: dict = field(default_factory=dict)
    """{"prefill": [node per instance], "decode": [...]} (empty: not named); an instance's
    entry may be a list of one node per PP stage."""
    disagg: dict = field(default_factory=dict)
    """DisaggConfig routing settings the plan assumed (keys from DISAGG_KEYS; empty: none)."""

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
        _check_disagg(self.disagg)
        _check_nodes(self)

    @property
    def instance_nodes(self) -> tuple[int | tuple[int, ...], ...] | None:
        """The node (or per-stage nodes) of each instance, prefill instances first (None:
        not named): `DisaggConfig.instance_nodes`."""
        if not self.nodes:
            return None
        entries = list(self.nodes["prefill"]) + list(self.nodes.get("decode") or ())
        return tuple(tuple(e) if isinstance(e, list) else e for e in entries)

    @property
    def num_devices(self) -> int:
        return self.prefill.num_devices + (self.decode.num_devices if self.decode else 0)

    def to_dict(self) -> dict:
        def phase(p):
            return None if p is None else {"tp": p.tp, "pp": p.pp, "num_instances": p.num_instances}

        out = {
            "model": self.model,
            "placement": self.placement,
            "prefill": phase(self.prefill),
            "decode": phase(self.decode),
            "cluster": self.cluster,
            "slo": self.slo,
            "engine": self.engine,
            "predicted": self.predicted,
        }
        # The optional sections only when set: files without them read as before.
        for key in ("nodes", "disagg"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def _check_nodes(pf: PlacementFile) -> None:
    if not pf.nodes:
        return
    phases = {"prefill": pf.prefill, "decode": pf.decode}
    if not isinstance(pf.nodes, dict) or set(pf.nodes) != {k for k, v in phases.items() if v}:
        raise ValueError(
            f"nodes must map each phase of the placement to a list of node indices, got "
            f"{pf.nodes!r}"
        )
    num_nodes = pf.cluster.get("num_nodes")
    for phase, indices in pf.nodes.items():
        want = phases[phase].num_instances  # type: ignore[union-attr]
        if not isinstance(indices, list) or len(indices) != want:
            raise ValueError(f"nodes.{phase} must list {want} node indices, got {indices!r}")
        pp = phases[phase].pp  # type: ignore[union-attr]
        for entry in indices:
            if isinstance(entry, list) and len(entry) != pp:
                raise ValueError(
                    f"nodes.{phase}: {entry!r} lists {len(entry)} stage nodes; the phase has "
                    f"pp={pp}: give one node, or one per stage"
                )
            for node in entry if isinstance(entry, list) else [entry]:
                if isinstance(node, bool) or not isinstance(node, int) or node < 0:
                    raise ValueError(f"nodes.{phase}: node indices are ints >= 0, got {node!r}")
                if num_nodes and node >= num_nodes:
                    raise ValueError(
                        f"nodes.{phase} names node {node}; the cluster has num_nodes={num_nodes}"
                    )


def assign_nodes(
    prefill: PhasePlacement,
    decode: PhasePlacement | None,
    devices_per_node: int,
    num_nodes_spanned: int = 1,
) -> dict:
    """The ``nodes`` entry `drt-run plan` writes.

    ``num_nodes_spanned > 1`` (an Algorithm-2 candidate, `planner.candidates.Candidate`):
    (prefill, decode) pairs, ``num_instances`` of each, each pair's pipeline across ``s``
    nodes, node ``j`` of its group holding stages ``j * pp / s`` .. of *both* instances
    (the same layers, the planner's `_segments`): "aligned", every stage's KV stays on its
    node. Pairs fill a group of ``s`` nodes as `candidates.num_nodes_needed` counts them
    (``devices_per_node // (tp * pp / s of both)`` pairs a group), then the next group.
    Entries are lists of one node per stage.

    Otherwise: whole instances packed onto nodes, prefill instances first (first node with
    room); {} when an instance is larger than a node (the ray launcher then spreads its PP
    stages over nodes itself)."""
    if num_nodes_spanned > 1:
        return _aligned_nodes(prefill, decode, devices_per_node, num_nodes_spanned)
    free: list[int] = []
    out: dict[str, list[int]] = {}
    for phase, p in (("prefill", prefill), ("decode", decode)):
        if p is None:
            continue
        need = p.tp * p.pp
        if need > devices_per_node:
            return {}
        out[phase] = []
        for _ in range(p.num_instances):
            node = next((k for k, f in enumerate(free) if f >= need), None)
            if node is None:
                free.append(devices_per_node)
                node = len(free) - 1
            free[node] -= need
            out[phase].append(node)
    return out


def _aligned_nodes(
    prefill: PhasePlacement, decode: PhasePlacement | None, devices_per_node: int, s: int
) -> dict:
    if decode is None or prefill.num_instances != decode.num_instances:
        raise ValueError(
            f"an aligned placement over {s} nodes places (prefill, decode) pairs: it needs as "
            f"many decode instances as prefill ones, got prefill={prefill!r}, decode={decode!r}"
        )
    for p in (prefill, decode):
        if p.pp % s:
            raise ValueError(
                f"an aligned placement over {s} nodes needs pp divisible by {s}, got {p!r}"
            )
    per_node = (prefill.tp * prefill.pp + decode.tp * decode.pp) // s
    pairs_per_group = devices_per_node // per_node
    if pairs_per_group < 1:
        raise ValueError(
            f"one pair puts {per_node} devices on each of its {s} nodes; a node has "
            f"{devices_per_node}"
        )
    out: dict[str, list[list[int]]] = {"prefill": [], "decode": []}
    for pair in range(prefill.num_instances):
        first = (pair // pairs_per_group) * s  # the pair group's first node
        for phase, p in (("prefill", prefill), ("decode", decode)):
            stages_per_node = p.pp // s
            out[phase].append([first + k // stages_per_node for k in range(p.pp)])
    return out


def _check_section(
    name: str, raw: dict, keys: tuple, int_keys: tuple, bool_keys: tuple, min_int: int
) -> None:
    """The shape both optional sections share: a mapping of known keys, ints >= `min_int`,
    booleans (the dataclasses serve builds check the ranges fully)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping of {keys}, got {raw!r}")
    unknown = set(raw) - set(keys)
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; allowed: {list(keys)}")
    for key in int_keys:
        value = raw.get(key, min_int)
        if isinstance(value, bool) or not isinstance(value, int) or value < min_int:
            what = "a positive int" if min_int == 1 else f"an int >= {min_int}"
            raise ValueError(f"{name}.{key} must be {what}, got {value!r}")
    for key in bool_keys:
        if not isinstance(raw.get(key, True), bool):
            raise ValueError(f"{name}.{key} must be true or false, got {raw[key]!r}")


def _check_engine(engine: dict) -> None:
    _check_section("engine", engine, ENGINE_KEYS, ENGINE_INT_KEYS, ENGINE_BOOL_KEYS, 1)
    fraction = engine.get("gpu_memory_utilization", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {fraction!r}")
    if not isinstance(engine.get("dtype", ""), str):
        raise ValueError(f"engine.dtype must be a string, got {engine['dtype']!r}")


def _check_disagg(disagg: dict) -> None:
    """A malformed ``disagg`` refused in one line (DisaggConfig checks the ranges fully when
    serve builds it; ints >= 0 here, as it allows)."""
    _check_section("disagg", disagg, DISAGG_KEYS, DISAGG_INT_KEYS, DISAGG_BOOL_KEYS, 0)


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
    keys |= {"nodes", "disagg"}
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
        nodes=raw.get("nodes") or {},
        disagg=_or_empty(raw.get("disagg")),
    )


def _or_empty(value):
    """An absent (or empty, ``disagg:``) section as {}; anything else as written, for
    `_check_disagg` to refuse (``raw.get(key) or {}`` would pass 0 or false as {})."""
    return {} if value is None else value


def load_placement(path: str | Path) -> PlacementFile:
    """Read and validate a placement file; ValueError naming what is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read placement file {str(path)!r}: {exc}") from None
    return placement_from_dict(raw)

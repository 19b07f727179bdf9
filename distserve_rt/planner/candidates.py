"""Deployments the placement search compares, each sized for the requested traffic rate.

The paper scores a configuration by its per-device goodput (goodput of one instance / its
devices) and then replicates it ``ceil(rate / goodput)`` times. Scored per instance, that
ignores the rounding: OPT-13B at 3 req/s on 4 × 8 A100s, the best per-device prefill
instance was tp2pp10 (10 req/s per device, 204 req/s each, 20 devices), so the search
deployed 20 prefill devices for 3 req/s while one tp1 device serves 4.4.

So every configuration here is a *deployment*: its replica counts, its devices
(``num_devices``) and its goodput (the rate its replicas carry together; disaggregated
phases replicated apart carry what the weaker phase's replicas carry), and deployments are
ranked by that goodput per device, replicas included, colocated and disaggregated alike,
then by fewest devices, then by fewest pipeline stages. A 20-device prefill tier behind a
1-device decode carries what the decode carries, so its per-device goodput is low and the
rounding above cannot win. The table, the chosen placement and the placement file all use
this one order (`Planner` puts the deployments that fit the cluster first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.config.placement import PlacementKind
from distserve_rt.planner.simulator import DisaggSpec, SimInstanceSpec


class Algorithm(str, Enum):
    """How a disaggregated deployment was searched (the paper's Algorithms 1 and 2)."""

    PHASES_APART = "phases_apart"
    """Algorithm 1: prefill and decode instances replicated independently."""
    PAIRS_IN_NODES = "pairs_in_nodes"
    """Algorithm 2: (prefill, decode) pairs sharing nodes, replicated together."""
    COLOCATED = "colocated"
    """Not disaggregated: colocated instances replicated."""


@dataclass
class Candidate:
    """One deployment that carries the requested rate: a row of the ranked table.

    Goodputs are req/s meeting the SLO attainment target. ``unit`` is what is simulated at
    the rate: a `DisaggSpec` with the replica counts (disaggregated), or one colocated
    instance (colocated replicas each take ``rate / num_prefill`` of the traffic).
    """

    algorithm: Algorithm
    prefill: Parallelism
    """TP x PP of a prefill instance; colocated: of the instance."""
    decode: Parallelism | None
    """TP x PP of a decode instance; None when colocated."""
    num_prefill: int
    """Prefill instances (Algorithm 2: pairs; colocated: instances) for the rate."""
    num_decode: int
    """Decode instances (Algorithm 2: pairs); 0 when colocated."""
    prefill_goodput: float
    """One prefill instance alone on TTFT (Algorithm 2: one pair; colocated: one instance)."""
    decode_goodput: float
    """One decode instance alone on TPOT (Algorithm 2: one pair; colocated: = prefill's)."""
    unit: DisaggSpec | SimInstanceSpec = field(repr=False)
    num_nodes_spanned: int = 1
    """Algorithm 2: nodes one pair's pipeline crosses (1 for the others)."""
    predicted: dict[str, object] = field(default_factory=dict)
    """The deployment simulated at the requested rate (filled by the planner)."""

    def __post_init__(self) -> None:
        self.algorithm = Algorithm(self.algorithm)
        if not self.prefill_goodput > 0 or not self.decode_goodput > 0:
            raise ValueError(
                f"a candidate needs goodputs > 0, got prefill_goodput={self.prefill_goodput!r}, "
                f"decode_goodput={self.decode_goodput!r}"
            )
        for key in ("prefill", "decode"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Parallelism):
                raise ValueError(f"{key} must be a Parallelism, got {value!r}")
        if (self.decode is None) != (self.algorithm is Algorithm.COLOCATED):
            raise ValueError(f"decode must be None exactly when colocated, got {self.decode!r}")

    @property
    def placement(self) -> PlacementKind:
        if self.algorithm is Algorithm.COLOCATED:
            return PlacementKind.COLOCATED
        return PlacementKind.DISAGGREGATED

    @property
    def devices_per_prefill(self) -> int:
        return self.prefill.world_size

    @property
    def devices_per_decode(self) -> int:
        return 0 if self.decode is None else self.decode.world_size

    @property
    def num_devices(self) -> int:
        """Devices of the whole deployment at the requested rate."""
        return self.num_prefill * self.devices_per_prefill + self.num_decode * (
            self.devices_per_decode
        )

    @property
    def goodput(self) -> float:
        """Rate the deployment carries: its weaker phase's replicas together, req/s."""
        if self.algorithm is Algorithm.PHASES_APART:
            return min(
                self.num_prefill * self.prefill_goodput, self.num_decode * self.decode_goodput
            )
        return self.num_prefill * self.prefill_goodput

    @property
    def per_device(self) -> float:
        """Per-device goodput of the deployment (req/s per device): ``goodput / num_devices``."""
        return self.goodput / self.num_devices

    @property
    def unit_per_device(self) -> float:
        """The paper's per-device goodput, replica counts unrounded (a very high rate)."""
        if self.algorithm is Algorithm.PHASES_APART:
            return 1.0 / (
                self.devices_per_prefill / self.prefill_goodput
                + self.devices_per_decode / self.decode_goodput
            )
        devices = self.devices_per_prefill + self.devices_per_decode
        return self.prefill_goodput / devices

    def rank_key(self) -> tuple[float, int, int]:
        """The most goodput per device first (replicas included), then the fewest devices,
        then the fewest pipeline stages (at equal cost, fewer hops: lower latency, simpler)."""
        num_stages = self.prefill.pp_size + (0 if self.decode is None else self.decode.pp_size)
        return -self.per_device, self.num_devices, num_stages

    def label(self) -> str:
        if self.decode is None:
            return f"colocated {parallelism_label(self.prefill)}"
        nodes = f" ({self.num_nodes_spanned} nodes)" if self.num_nodes_spanned > 1 else ""
        return f"P {parallelism_label(self.prefill)} + D {parallelism_label(self.decode)}{nodes}"


def parallelism_label(parallelism: Parallelism) -> str:
    """``tp2pp3``: how the planner's table, its choice and its rejections name a TP x PP
    (denser than ``str(parallelism)``, ``tp=2, pp=3``, for a column of configs)."""
    return f"tp{parallelism.tp_size}pp{parallelism.pp_size}"


def num_replicas(rate: float, goodput: float) -> int:
    """Instances of ``goodput`` req/s each needed to carry ``rate`` req/s (at least one)."""
    if not goodput > 0:
        raise ValueError(f"goodput must be > 0 req/s, got {goodput!r}")
    # A hair of tolerance: 3.0 / 1.5 computed as 2.0000000001 must not round up to 3.
    return max(1, math.ceil(rate / goodput - 1e-9))


def fit_to_cluster(cand: Candidate, num_devices: int) -> Candidate | None:
    """``cand``'s configuration with as many replicas as ``num_devices`` devices hold and
    carry the most goodput (the rate the cluster sustains with it), or None if not even
    one replica of each instance fits. Phases replicated apart: the (prefill, decode)
    counts whose weaker phase carries the most, each count then cut to what that needs."""
    if cand.algorithm is not Algorithm.PHASES_APART:
        devices = cand.devices_per_prefill + cand.devices_per_decode
        n = num_devices // devices
        if n < 1:
            return None
        unit = cand.unit if cand.decode is None else replace(cand.unit, num_prefill=n, num_decode=n)
        return replace(
            cand, num_prefill=n, num_decode=0 if cand.decode is None else n, unit=unit, predicted={}
        )
    d_p, d_d = cand.devices_per_prefill, cand.devices_per_decode
    best = 0.0
    for n_p in range(1, (num_devices - d_d) // d_p + 1):
        n_d = (num_devices - n_p * d_p) // d_d
        best = max(best, min(n_p * cand.prefill_goodput, n_d * cand.decode_goodput))
    if best <= 0:
        return None
    n_p = num_replicas(best, cand.prefill_goodput)
    n_d = num_replicas(best, cand.decode_goodput)
    unit = replace(cand.unit, num_prefill=n_p, num_decode=n_d)
    return replace(cand, num_prefill=n_p, num_decode=n_d, unit=unit, predicted={})


def num_nodes_needed(cand: Candidate, devices_per_node: int) -> int:
    """Nodes of ``devices_per_node`` devices that ``cand`` needs: pairs in nodes take
    ``num_nodes_spanned`` nodes per group of pairs, colocated instances pack whole into
    nodes; phases replicated apart are counted by devices (instances may span nodes)."""
    if cand.algorithm is Algorithm.PHASES_APART:
        return math.ceil(cand.num_devices / devices_per_node)
    per_node = (cand.devices_per_prefill + cand.devices_per_decode) / cand.num_nodes_spanned
    per_group = max(1, int(devices_per_node // per_node))
    return cand.num_nodes_spanned * math.ceil(cand.num_prefill / per_group)

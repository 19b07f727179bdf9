"""Where the ray launcher puts each instance and how each pair of ranks moves KV:
pure decisions on the cluster's node list (`ray_cluster.ClusterNode`), tested without Ray.

An instance goes wholly on one node when one has room; otherwise its PP stages go to
nodes (a stage's TP group never splits). Ranks are stage-major, as `distributed.launch`
lays them out (rank = pp_rank * tp + tp_rank), so each stage's ranks share a node.

KV moves per (prefill rank, decode rank) pair (`rank_transports`): shm when both ranks are
on one node, nixl otherwise, and only between ranks whose layers overlap. DistServe's
"aligned" placement (`drt-run plan`'s Algorithm-2 files: each node holds the same layer
segment of a prefill and a decode instance) thus keeps every pull on its node.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.distributed import ray_cluster
from distserve_rt.distributed.parallel_state import partition_layers
from distserve_rt.engine.disagg.instance import InstanceRole

StageNodes = tuple[int, ...]
"""The node index of each PP stage of one instance (every stage's TP ranks on its node)."""


@dataclass(frozen=True, slots=True)
class InstanceLayout:
    """Where one instance's ranks run: its TP size and the node of each PP stage."""

    tp: int
    stage_nodes: StageNodes

    @property
    def num_ranks(self) -> int:
        return self.tp * len(self.stage_nodes)

    def node_of(self, rank: int) -> int:
        return self.stage_nodes[rank // self.tp]


RankTransports = tuple[tuple[str | None, ...], ...]
"""``[decode rank][prefill rank]``: the transport that rank pair moves KV through, None
where it moves none (their layers do not overlap)."""


def node_transport(prefill_node: int, decode_node: int, transport: str) -> str:
    """The transport between two ranks: the configured one, or for "auto" shm when both
    are on one node and nixl otherwise (never a fallback)."""
    if transport != "auto":
        return transport
    return "shm" if prefill_node == decode_node else "nixl"


def rank_transports(
    prefill: InstanceLayout, decode: InstanceLayout, num_layers: int, transport: str
) -> RankTransports:
    """The transport of each (decode rank, prefill rank) pair of one (prefill, decode)
    pair of instances. Only ranks of stages whose layers overlap move KV
    (`transfer.plan_kv_pulls` reads a decode stage's layers from those stages alone; a
    TP group shares its node, so its heads do not change the choice): an aligned pair,
    each node holding the same layers of both instances, needs no nixl at all."""
    p_ranges = partition_layers(num_layers, len(prefill.stage_nodes))
    d_ranges = partition_layers(num_layers, len(decode.stage_nodes))
    rows = []
    for d_rank in range(decode.num_ranks):
        d0, d1 = d_ranges[d_rank // decode.tp]
        row = []
        for p_rank in range(prefill.num_ranks):
            p0, p1 = p_ranges[p_rank // prefill.tp]
            overlap = max(d0, p0) < min(d1, p1)
            node_pair = prefill.node_of(p_rank), decode.node_of(d_rank)
            row.append(node_transport(*node_pair, transport) if overlap else None)
        rows.append(tuple(row))
    return tuple(rows)


def instance_transports(
    roles: list[InstanceRole], layouts: list[InstanceLayout], num_layers: int, transport: str
) -> list[str]:
    """Per instance, what it exports (prefill) or reads (decode) through: the transports
    of its rank pairs with every peer (`rank_transports`), ``shm+nixl`` when they need
    both."""
    names = []
    for role, layout in zip(roles, layouts, strict=True):
        used: set[str | None] = set()
        for peer_role, peer in zip(roles, layouts, strict=True):
            if peer_role is role:
                continue
            pair = (layout, peer) if role is InstanceRole.PREFILL else (peer, layout)
            used.update(t for row in rank_transports(*pair, num_layers, transport) for t in row)
        joined = "+".join(t for t in ("shm", "nixl") if t in used)
        # No peers (a lone instance): what the configured rule gives ranks on one node.
        names.append(joined or node_transport(0, 0, transport))
    return names


def assign_nodes(
    shapes: list[tuple[int, int]],
    cluster: list[ray_cluster.ClusterNode],
    wanted: tuple[int | StageNodes, ...] | None,
) -> list[StageNodes]:
    """The node of each PP stage of each instance (`shapes`: its (tp, pp)), ranks ordered
    stage-major as `distributed.launch` lays them out (rank = pp_rank * tp + tp_rank).

    `wanted` (`DisaggConfig.instance_nodes`: per instance a node, or a node per stage) is
    checked against the cluster. Otherwise each instance goes, in turn, to the first node
    with room (CPUs) for all its ranks, or, when none has, its stages to the first nodes
    with room for one stage each: PP across nodes; a stage (a TP group) never splits.
    Raises a one-line ValueError for what cannot be placed."""
    have = ", ".join(f"node {i}: {n.describe()}" for i, n in enumerate(cluster)) or "no node"
    if wanted is not None:
        return _check_wanted(shapes, cluster, wanted, have)
    free = [n.num_cpus for n in cluster]
    placed = []
    for i, (tp, pp) in enumerate(shapes):
        node = next((k for k, f in enumerate(free) if f >= tp * pp), None)
        stages = [node] * pp if node is not None else []
        if node is None:
            if tp > max((n.num_cpus for n in cluster), default=0):
                raise ValueError(
                    f"instance {i}: tensor_parallel_size={tp} ranks must share a node (a TP "
                    f"group never spans nodes; PP stages may) and no node has {tp} CPUs "
                    f"({have})"
                )
            for _ in range(pp):
                node = next((k for k, f in enumerate(free) if f >= tp), None)
                if node is None:
                    raise ValueError(
                        f"the cluster has no room for instance {i} ({pp} stages of {tp} CPUs) "
                        f"after the ones before it ({have})"
                    )
                free[node] -= tp
                stages.append(node)
        else:
            free[node] -= tp * pp
        placed.append(tuple(stages))
    return placed


def _check_wanted(
    shapes: list[tuple[int, int]],
    cluster: list[ray_cluster.ClusterNode],
    wanted: tuple[int | StageNodes, ...],
    have: str,
) -> list[StageNodes]:
    shown = [list(w) if isinstance(w, tuple) else w for w in wanted]
    if len(wanted) != len(shapes):
        raise ValueError(
            f"instance_nodes={shown} names {len(wanted)} instances; the placement "
            f"has {len(shapes)} (prefill instances first)"
        )
    placed = []
    used = [0.0] * len(cluster)
    for i, (w, (tp, pp)) in enumerate(zip(wanted, shapes, strict=True)):
        stages = stage_nodes(w) * pp if isinstance(w, int) else tuple(w)
        if len(stages) != pp:
            raise ValueError(
                f"instance_nodes={shown} gives instance {i} {len(stages)} stage nodes; it has "
                f"pipeline_parallel_size={pp}: give one node, or one per stage"
            )
        for node in stages:
            if node >= len(cluster):
                raise ValueError(
                    f"instance_nodes={shown} names node {node}; the cluster has "
                    f"{len(cluster)} ({have})"
                )
            used[node] += tp
        placed.append(stages)
    for node, total in enumerate(used):
        if total > cluster[node].num_cpus:
            raise ValueError(
                f"instance_nodes={shown} puts {total:g} ranks on node {node}, which "
                f"has {cluster[node].num_cpus:g} CPUs ({have})"
            )
    return placed


def stage_nodes(nodes: int | StageNodes) -> StageNodes:
    """An instance's nodes as one per stage-group: a bare node index is ``(node,)``."""
    return (nodes,) if isinstance(nodes, int) else tuple(nodes)

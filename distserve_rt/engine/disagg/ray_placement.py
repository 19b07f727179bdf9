"""Where the ray launcher puts each instance and how each (prefill, decode) pair moves KV:
pure decisions on the cluster's node list (`ray_cluster.ClusterNode`), tested without Ray.

An instance goes wholly on one node when one has room; otherwise its PP stages go to
nodes (a stage's TP group never splits). Ranks are stage-major, as `distributed.launch`
lays them out (rank = pp_rank * tp + tp_rank), so each stage's ranks share a node.
"""

from __future__ import annotations

from distserve_rt.distributed import ray_cluster
from distserve_rt.engine.disagg.instance import InstanceRole

StageNodes = tuple[int, ...]
"""The node index of each PP stage of one instance (every stage's TP ranks on its node)."""


def pair_transport(
    prefill_nodes: int | StageNodes, decode_nodes: int | StageNodes, transport: str
) -> str:
    """The transport one (prefill, decode) pair moves KV through: the configured one, or
    for "auto" shm when both instances are wholly on one node, nixl otherwise (ends on
    different nodes, or either spanning nodes; never a fallback)."""
    if transport != "auto":
        return transport
    nodes = set(stage_nodes(prefill_nodes)) | set(stage_nodes(decode_nodes))
    return "shm" if len(nodes) == 1 else "nixl"


def instance_transports(
    roles: list[InstanceRole], nodes: list[int | StageNodes], transport: str
) -> list[str]:
    """Per instance, what it exports (prefill) or reads (decode) through: one transport,
    or ``shm+nixl`` when its peers are on its node and on others."""
    names = []
    for role, node in zip(roles, nodes, strict=True):
        peers = [n for r, n in zip(roles, nodes, strict=True) if r is not role]
        used = {
            pair_transport(node, p, transport) if role is InstanceRole.PREFILL else
            pair_transport(p, node, transport)
            for p in peers
        }  # fmt: skip
        names.append("+".join(t for t in ("shm", "nixl") if t in used) or "shm")
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

"""The ray launcher's choices that need no cluster: which node each instance goes to, and
which transport each (prefill rank, decode rank) pair and each instance uses."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig
from distserve_rt.distributed.ray_cluster import ClusterNode
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.ray_placement import (
    InstanceLayout,
    assign_nodes,
    instance_transports,
    node_transport,
    rank_transports,
)

P, D = InstanceRole.PREFILL, InstanceRole.DECODE
CLUSTER = [ClusterNode("10.0.0.1", "a", 4, 0, True), ClusterNode("10.0.0.2", "b", 4, 0, False)]


def _one(*num_ranks: int) -> list[tuple[int, int]]:
    """TP-only instances of these sizes, as (tp, pp)."""
    return [(n, 1) for n in num_ranks]


def test_first_node_with_room_in_instance_order():
    assert assign_nodes(_one(2, 2, 1, 3), CLUSTER, None) == [(0,), (0,), (1,), (1,)]
    # An instance that fits one node keeps all its stages there.
    assert assign_nodes([(1, 2), (2, 2)], CLUSTER, None) == [(0, 0), (1, 1)]


def test_named_nodes_checked_against_the_cluster():
    assert assign_nodes(_one(2, 1), CLUSTER, (1, 0)) == [(1,), (0,)]
    with pytest.raises(ValueError, match=r"names node 2; the cluster has 2"):
        assign_nodes(_one(1, 1), CLUSTER, (0, 2))
    with pytest.raises(ValueError, match=r"puts 5 ranks on node 0, which has 4 CPUs"):
        assign_nodes(_one(3, 2), CLUSTER, (0, 0))
    with pytest.raises(ValueError, match=r"names 1 instances; the placement has 2"):
        assign_nodes(_one(1, 1), CLUSTER, (0,))
    with pytest.raises(ValueError, match="no room for instance 2"):
        assign_nodes(_one(4, 4, 1), CLUSTER, None)


def test_instance_larger_than_any_node_spans_nodes_by_stage():
    """8 ranks, 4 CPUs per node: PP stages across nodes, each stage's TP group on one."""
    assert assign_nodes([(4, 2)], CLUSTER, None) == [(0, 1)]
    assert assign_nodes([(2, 4)], CLUSTER, None) == [(0, 0, 1, 1)]
    # The room left by earlier instances counts: 3 + 3 ranks, then a PP=2 of 2 CPUs each.
    assert assign_nodes([(3, 1), (3, 1), (1, 2)], CLUSTER, None) == [(0,), (1,), (0, 1)]


def test_a_stage_never_splits_across_nodes():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 ranks must share a node") as e:
        assign_nodes([(8, 1)], CLUSTER, None)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"no room for instance 1 \(2 stages of 3 CPUs\)"):
        assign_nodes([(1, 2), (3, 2)], CLUSTER, None)


def test_named_stage_nodes():
    """instance_nodes entries: a node (every stage there) or one node per stage."""
    assert assign_nodes([(1, 2), (1, 1)], CLUSTER, ((0, 1), 1)) == [(0, 1), (1,)]
    assert assign_nodes([(2, 2)], CLUSTER, (1,)) == [(1, 1)]
    with pytest.raises(ValueError, match=r"gives instance 0 3 stage nodes; it has "
                       r"pipeline_parallel_size=2: give one node, or one per stage"):  # fmt: skip
        assign_nodes([(1, 2)], CLUSTER, ((0, 1, 1),))
    with pytest.raises(ValueError, match=r"puts 6 ranks on node 1, which has 4 CPUs"):
        assign_nodes([(3, 2)], CLUSTER, ((1, 1),))


def test_instance_nodes_config_accepts_stage_lists():
    assert DisaggConfig(instance_nodes=[[0, 1], 1]).instance_nodes == ((0, 1), 1)
    with pytest.raises(ValueError, match=r"a list of them, one per PP stage; got \[\[0, -1\]\]"):
        DisaggConfig(instance_nodes=[[0, -1]])
    with pytest.raises(ValueError, match="one per PP stage"):
        DisaggConfig(instance_nodes=[[]])


def _layouts(*entries) -> list[InstanceLayout]:
    """TP=1 instances: a bare node is one stage there, a tuple one node per stage."""
    return [InstanceLayout(1, e if isinstance(e, tuple) else (e,)) for e in entries]


def test_transport_chosen_per_pair_not_per_instance():
    assert node_transport(0, 0, "auto") == "shm" and node_transport(0, 1, "auto") == "nixl"
    assert node_transport(0, 0, "nixl") == "nixl"  # asked for: used even on one node
    # 2P2D on 2 nodes: every instance has a peer on its node and one on the other.
    assert instance_transports([P, P, D, D], _layouts(0, 1, 0, 1), 4, "auto") == ["shm+nixl"] * 4
    assert instance_transports([P, D], _layouts(0, 1), 4, "auto") == ["nixl", "nixl"]
    assert instance_transports([P, D, D], _layouts(0, 0, 1), 4, "auto") == [
        "shm+nixl",
        "shm",
        "nixl",
    ]


def test_transport_chosen_per_rank_pair_between_ranks_that_move_kv():
    """[decode rank][prefill rank]: only stages whose layers overlap move KV (None: the
    pair reads nothing), shm when both ranks are on one node."""
    aligned = InstanceLayout(1, (0, 1))
    assert rank_transports(aligned, aligned, 4, "auto") == (("shm", None), (None, "shm"))
    assert rank_transports(aligned, InstanceLayout(1, (1, 0)), 4, "auto") == (
        ("nixl", None),
        (None, "nixl"),
    )
    # A one-stage decode on node 0 reads both prefill stages: one local, one remote.
    assert rank_transports(aligned, InstanceLayout(1, (0,)), 4, "auto") == (("shm", "nixl"),)
    # TP=2 x PP=2 prefill, PP=4 decode two stages a node (aligned): every rank of a stage
    # pair on one node; decode stage j reads prefill stage j // 2 (its layers), both TP ranks.
    p, d = InstanceLayout(2, (0, 1)), InstanceLayout(1, (0, 0, 1, 1))
    assert rank_transports(p, d, 8, "auto") == (
        ("shm", "shm", None, None),
        ("shm", "shm", None, None),
        (None, None, "shm", "shm"),
        (None, None, "shm", "shm"),
    )
    assert rank_transports(p, d, 8, "nixl")[0] == ("nixl", "nixl", None, None)  # as asked


def test_an_aligned_pair_needs_no_nixl_a_crossed_one_does():
    """An end spanning nodes no longer forces nixl: the rank pairs decide."""
    assert instance_transports([P, D], _layouts((0, 1), (0, 1)), 4, "auto") == ["shm", "shm"]
    assert instance_transports([P, D, D], _layouts((0, 1), (0, 1), (1, 0)), 4, "auto") == [
        "shm+nixl",
        "shm",
        "nixl",
    ]
    # A whole-node decode reads a spanning prefill's stages through both.
    assert instance_transports([P, D], _layouts((0, 1), 0), 4, "auto") == ["shm+nixl"] * 2
    assert instance_transports([P], _layouts(0), 4, "auto") == ["shm"]  # no peer

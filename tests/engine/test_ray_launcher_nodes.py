"""The ray launcher's choices that need no cluster: which node each instance goes to, and
which transport each (prefill, decode) pair and each instance uses."""

from __future__ import annotations

import pytest

from distserve_rt.distributed.ray_cluster import ClusterNode
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.ray_launcher import (
    assign_nodes,
    instance_transports,
    pair_transport,
)

P, D = InstanceRole.PREFILL, InstanceRole.DECODE
CLUSTER = [ClusterNode("10.0.0.1", "a", 4, 0, True), ClusterNode("10.0.0.2", "b", 4, 0, False)]


def test_first_node_with_room_in_instance_order():
    assert assign_nodes([2, 2, 1, 3], CLUSTER, None) == [0, 0, 1, 1]


def test_named_nodes_checked_against_the_cluster():
    assert assign_nodes([2, 1], CLUSTER, (1, 0)) == [1, 0]
    with pytest.raises(ValueError, match=r"names node 2; the cluster has 2"):
        assign_nodes([1, 1], CLUSTER, (0, 2))
    with pytest.raises(ValueError, match=r"puts 5 ranks on node 0, which has 4 CPUs"):
        assign_nodes([3, 2], CLUSTER, (0, 0))
    with pytest.raises(ValueError, match=r"names 1 instances; the placement has 2"):
        assign_nodes([1, 1], CLUSTER, (0,))
    with pytest.raises(ValueError, match="no room for instance 2"):
        assign_nodes([4, 4, 1], CLUSTER, None)


def test_instance_larger_than_any_node_would_span_nodes():
    with pytest.raises(NotImplementedError, match="spanning nodes .PP across nodes. is not built"):
        assign_nodes([8], CLUSTER, None)


def test_transport_chosen_per_pair_not_per_instance():
    assert pair_transport(0, 0, "auto") == "shm" and pair_transport(0, 1, "auto") == "nixl"
    assert pair_transport(0, 0, "nixl") == "nixl"  # asked for: used even on one node
    # 2P2D on 2 nodes: every instance has a peer on its node and one on the other.
    assert instance_transports([P, P, D, D], [0, 1, 0, 1], "auto") == ["shm+nixl"] * 4
    assert instance_transports([P, D], [0, 1], "auto") == ["nixl", "nixl"]
    assert instance_transports([P, D, D], [0, 0, 1], "auto") == ["shm+nixl", "shm", "nixl"]

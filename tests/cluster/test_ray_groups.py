"""Placement groups on the fake 2-node cluster: bundles land where the placement names,
infeasible groups fail in one line (never a hang), and a torch.distributed group spans
both nodes through tcp://<rank-0 node ip>:<port>."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from distserve_rt.distributed import ray_cluster
from distserve_rt.distributed.ray_worker_group import PlacementError, RayWorkerGroup
from tests.cluster.conftest import HEAD_IP, NUM_CPUS_PER_NODE, WORKER_IP

pytestmark = pytest.mark.timeout(60)

# The rank functions below travel by value: the actors cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_nodes_head_first(fake_cluster):
    nodes = ray_cluster.nodes()
    assert [n.ip for n in nodes] == [HEAD_IP, WORKER_IP]
    assert nodes[0].is_head and nodes[0].num_cpus == NUM_CPUS_PER_NODE


def test_prefill_packed_on_node0_decode_on_node1(fake_cluster):
    """TP=2 prefill: both bundles on node 0 (STRICT_PACK, bundle 0 pinned); decode on 1."""
    prefill = RayWorkerGroup("prefill-0", [{"CPU": 1}] * 2, [HEAD_IP, None], timeout_s=20)
    decode = RayWorkerGroup("decode-0", [{"CPU": 1}], [WORKER_IP], timeout_s=20)
    try:
        assert prefill.node_ips == [HEAD_IP, HEAD_IP]
        assert decode.node_ips == [WORKER_IP]
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_unknown_node_refused_in_one_line(fake_cluster):
    with pytest.raises(PlacementError, match=r"node 10\.9\.9\.9 is not in the cluster") as e:
        RayWorkerGroup("prefill-0", [{"CPU": 1}], ["10.9.9.9"], timeout_s=5)
    assert "\n" not in str(e.value)


def test_too_many_ranks_for_one_node_refused(fake_cluster):
    with pytest.raises(PlacementError, match="needs 5 CPUs on one node") as e:
        RayWorkerGroup("prefill-0", [{"CPU": 1}] * 5, [HEAD_IP] + [None] * 4, timeout_s=5)
    assert "\n" not in str(e.value)


def test_busy_cluster_times_out_in_one_line(fake_cluster):
    """Feasible in all but held by another group: pg.ready() times out, never hangs."""
    hog = RayWorkerGroup("hog", [{"CPU": NUM_CPUS_PER_NODE}], [WORKER_IP], timeout_s=20)
    try:
        with pytest.raises(PlacementError, match="placement_timeout_s=1") as e:
            RayWorkerGroup("decode-0", [{"CPU": 1}], [WORKER_IP], timeout_s=1)
        assert "\n" not in str(e.value)
    finally:
        hog.shutdown()


def _all_reduce_rank(rank: int) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return [t.item(), float(dist.get_world_size())]


def _pp_send_recv(rank: int) -> float:
    """Rank 0 (node 0) sends an activation to rank 1 (node 1): a PP stage boundary."""
    import torch.distributed as dist

    t = torch.full((4,), 7.0) if rank == 0 else torch.zeros(4)
    if rank == 0:
        dist.send(t, dst=1)
    else:
        dist.recv(t, src=0)
    return float(t.sum())


def test_torch_distributed_group_across_nodes(fake_cluster):
    """One rank per node (PACK, bundles pinned): ranks ordered by node, gloo rendezvous at
    the rank-0 node's address, all_reduce (TP) and send/recv (PP) across the nodes."""
    group = RayWorkerGroup(
        "tp-pp", [{"CPU": 1}] * 2, [WORKER_IP, HEAD_IP], strategy="PACK", timeout_s=20
    )
    try:
        assert group.node_ips == [HEAD_IP, WORKER_IP]  # reordered by node
        init = group.init_torch_distributed(timeout_s=30)
        assert init.startswith(f"tcp://{HEAD_IP}:")
        assert group.run_all(_all_reduce_rank) == [[3.0, 2.0], [3.0, 2.0]]
        assert group.run_all(_pp_send_recv) == [28.0, 28.0]
    finally:
        group.shutdown()


def test_actor_death_reaches_the_handle_as_actor_died(fake_cluster):
    """The liveness path that does not need the connection to close (a lost node on a real
    network sends no FIN): the actor's `run` ends in ActorDiedError, the handle's sentinel
    becomes readable and says why."""
    import os
    from multiprocessing.connection import wait

    from distserve_rt.engine.disagg.ray_launcher import RayInstanceHandle

    group = RayWorkerGroup("decode-0", [{"CPU": 1}], [WORKER_IP], timeout_s=20)
    run_ref = group.actors[0].run.remote(os._exit, 1)
    handle = RayInstanceHandle(_spec(), group, 1, run_ref, pid=0)
    assert wait([handle.sentinel], timeout=20) == [handle.sentinel]
    assert not handle.is_running()
    assert "its Ray actor died (ActorDiedError" in handle.death_reason
    handle.stop(1.0)
    handle.stop(1.0)  # the death rules stop it, shutdown again: the second does nothing


def _spec():
    from distserve_rt.config import DisaggConfig, EngineConfig
    from distserve_rt.engine.disagg.instance import InstanceRole, InstanceSpec

    config = EngineConfig(model="dummy:llama-tiny")
    return InstanceSpec(InstanceRole.DECODE, 0, config, DisaggConfig(launcher="ray"), "nixl")

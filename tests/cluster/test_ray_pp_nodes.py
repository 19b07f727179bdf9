"""An instance whose PP stages span the fake cluster's 2 nodes: stage 0's ranks spawned by
the driver on node 0, stage 1's ranks Ray actors on node 1 (`distributed.ray_ranks`), TP
groups within a node and PP send/recv across; then the same as a prefill instance serving
with the single-machine tokens (to an aligned decode instance, KV over shm for every rank
pair, and to one spanning the other way, over nixl), and a remote rank killed ending the
instance (no hang)."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.distributed import ray_cluster
from distserve_rt.distributed.launch import LaunchConfig, WorkerFailedError, WorkerGroup
from distserve_rt.distributed.ray_ranks import RankPlacement, RayRank, RayRankStarter
from distserve_rt.distributed.ray_worker_group import NODE_SLIVER
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.protocol import EngineDeadError
from tests.cluster.conftest import HEAD_IP, MAX_TOKENS, WORKER_IP
from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy, run, settle

pytestmark = pytest.mark.timeout(120)

# The rank function travels by value to the Ray ranks (they cannot import this module);
# the spawned ranks import it by name, as in tests/worker/test_launch.py.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _layout_and_hops(ctx, conn) -> None:
    """Answers its layout, a TP all-reduce (within its node) and the activation its stage
    received over PP (stage 0 -> stage 1, across nodes), then serves until told to exit."""
    import torch.distributed as dist

    from distserve_rt.distributed.launch import recv_message, send_ok

    p = ctx.parallel
    total = p.all_reduce(torch.tensor([float(ctx.rank)]))
    hop = torch.full((4,), float(ctx.rank + 10))
    if ctx.next_rank is not None:
        dist.send(hop, dst=ctx.next_rank)
    if ctx.prev_rank is not None:
        dist.recv(hop, src=ctx.prev_rank)
    send_ok(conn, (ctx.rank, p.tp_rank, p.pp_rank, total.item(), hop[0].item()))
    while (message := recv_message(conn)) is not None:
        send_ok(conn, message)


def _pinned_group(ips: list[str]):
    from ray.util.placement_group import placement_group

    bundles = [{"CPU": 1, ray_cluster.node_resource(ip): NODE_SLIVER} for ip in ips]
    pg = placement_group(bundles, strategy="PACK")
    ray.get(pg.ready(), timeout=20)
    return pg


def test_pp_stages_on_two_nodes_then_a_remote_rank_dies(fake_cluster):
    """TP=2 x PP=2: ranks 0, 1 (stage 0) on node 0, ranks 2, 3 (stage 1) on node 1; rank
    = pp_rank * tp + tp_rank as on one machine. Killing rank 3's actor surfaces at the
    driver as WorkerFailedError (not a hang), and shutdown leaves nothing running."""
    from ray.util.placement_group import remove_placement_group

    ips = [HEAD_IP, HEAD_IP, WORKER_IP, WORKER_IP]
    pg = _pinned_group(ips)
    starter = RayRankStarter(RankPlacement(pg, tuple(ips)), "pp-nodes")
    group = WorkerGroup(LaunchConfig(tp_size=2, pp_size=2, timeout_s=60), _layout_and_hops,
                        starter=starter)  # fmt: skip
    try:
        assert starter.rank_node_ips == ips  # stage 1's ranks reported node 1 themselves
        assert [type(p) is RayRank for p in group.processes] == [False, False, True, True]
        assert group.gather(timeout_s=60) == [
            (0, 0, 0, 1.0, 10.0),
            (1, 1, 0, 1.0, 11.0),
            (2, 0, 1, 5.0, 10.0),  # rank 0's activation, from node 0
            (3, 1, 1, 5.0, 11.0),
        ]
        group.send([2], "ping")
        assert group.recv(2, timeout_s=30) == "ping"
        ray.kill(group.processes[3].actor, no_restart=True)
        with pytest.raises(WorkerFailedError, match="worker 3 "):
            group.recv(0, timeout_s=30)  # rank 0 never answers: the death ends the wait
    finally:
        group.shutdown(timeout_s=5)
        remove_placement_group(pg)
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in group.processes):
        assert time.monotonic() < deadline, "a rank outlived shutdown"
        time.sleep(0.1)


def _spanning_prefill(fake_cluster) -> tuple[Placement, DisaggConfig]:
    """Prefill PP=2 over nodes (0, 1); decode-0 aligned with it over (0, 1), decode-1 the
    other way round over (1, 0)."""
    placement = Placement.disaggregated(
        PhaseConfig(tp=1, pp=2), PhaseConfig(tp=1, pp=2, num_instances=2)
    )
    config = DisaggConfig(
        launcher="ray", ray_address=fake_cluster.address,
        instance_nodes=((0, 1), (0, 1), (1, 0)), placement_timeout_s=20, startup_timeout_s=60,
    )  # fmt: skip
    return placement, config


def _bundle_nodes(pg) -> list[str]:
    by_id = {n.node_id: n.ip for n in ray_cluster.nodes()}
    table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [by_id[table[i]] for i in range(len(table))]


def _remote_rank_actor(instance: str):
    names = ray.util.list_named_actors(all_namespaces=True)
    found = [n for n in names if n["name"].startswith(f"drt-{instance}-rank1-")]
    assert len(found) == 1, names
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def test_prefill_spanning_nodes_serves_then_its_remote_rank_dies(fake_cluster, single_machine):
    """Prefill TP=1 x PP=2 with stage 0 on node 0 and stage 1 on node 1. Decode-0 TP=1 x
    PP=2 aligned with it (stage k of both on node k): every rank pair moves KV over shm,
    the instances hold no nixl at all. Decode-1 the other way round: each of its ranks
    pulls over nixl, one of them a Ray actor rank. Greedy tokens of the single-machine run.
    Then stage 1's rank is killed mid-load: the prefill instance dies by the existing
    rules, every request ends (the prefill's own fail clearly, none hangs)."""
    placement, config = _spanning_prefill(fake_cluster)
    with Controller(engine_config(), placement, config) as c:
        prefill, aligned, crossed = c.instances
        decodes = (aligned, crossed)
        assert prefill.stage_nodes == (0, 1) and prefill.node_ip == HEAD_IP
        assert prefill.spec.rank_placement.node_ips == (HEAD_IP, WORKER_IP)
        assert _bundle_nodes(prefill.group.pg) == [HEAD_IP, WORKER_IP]  # rank r: bundle r
        # Decode-1 spans the other way: its actor (stage 0) on node 1.
        assert crossed.node_ip == WORKER_IP
        assert crossed.spec.rank_placement.node_ips == (WORKER_IP, HEAD_IP)
        # [decode rank][prefill rank]: stage k pulls from stage k only (the same layers).
        assert aligned.rank_transports == {0: (("shm", None), (None, "shm"))}
        assert crossed.rank_transports == {0: (("nixl", None), (None, "nixl"))}
        assert [h.spec.transport for h in c.instances] == ["shm+nixl", "shm", "nixl"]
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == single_machine
        settle(c, lambda: c.stats().transfers.num_transfers >= len(PROMPTS))
        stats = c.stats()
        assert stats.transfers.transport == "shm+nixl" and stats.transfers.num_failures == 0
        # Both decodes pulled KV: decode-0's through its shm transport alone.
        pulled = {s.name: s.num_blocks_pulled for s in stats.instances if s.role == "decode"}
        assert all(pulled[h.name] > 0 for h in decodes), pulled

        for i in range(len(PROMPTS)):
            c.add_request(f"late-{i}", PROMPTS[i], greedy(MAX_TOKENS))
        ray.kill(_remote_rank_actor(prefill.name), no_restart=True)
        outputs, deadline = {}, time.monotonic() + 60
        while c.has_unfinished_requests():
            assert time.monotonic() < deadline, "requests hung after a remote rank died"
            outputs.update({o.request_id: o for o in c.step(0.01) if o.finished})
        settle(c, lambda: not prefill.alive, timeout_s=30)
        assert aligned.alive and crossed.alive
        assert len(outputs) == len(PROMPTS)
        for out in outputs.values():
            if out.outputs[0].finish_reason == "error":
                assert "prefill-0" in (out.error or ""), out
            else:  # prefilled before the kill: decoded as usual
                want = single_machine[out.request_id.split("-")[1]]
                assert out.outputs[0].token_ids == want
        # New requests are refused at once, clearly: no prefill instance is left.
        with pytest.raises(EngineDeadError, match="every prefill instance is dead"):
            c.add_request("after", PROMPTS[0], greedy(MAX_TOKENS))

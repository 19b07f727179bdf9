"""Disaggregated serving with launcher="ray" on the fake 2-node cluster: instances placed
on the nodes asked for, KV pulled through nixl between nodes and shm within one, greedy
tokens equal to the single-machine (colocated) run."""

from __future__ import annotations

import time

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from tests.cluster.conftest import HEAD_IP, WORKER_IP
from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy, run

pytestmark = pytest.mark.timeout(90)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def single_machine():
    engine = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return outputs


def _ray(fake_cluster, nodes, **kw) -> DisaggConfig:
    return DisaggConfig(
        launcher="ray", ray_address=fake_cluster.address, instance_nodes=nodes,
        placement_timeout_s=20, startup_timeout_s=60, **kw,
    )  # fmt: skip


def test_prefill_on_node0_decode_on_node1_pull_through_nixl(fake_cluster, single_machine):
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig())
    with Controller(engine_config(), placement, _ray(fake_cluster, (0, 1))) as c:
        assert [(h.name, h.node_ip, h.spec.transport) for h in c.instances] == [
            ("prefill-0", HEAD_IP, "nixl"),
            ("decode-0", WORKER_IP, "nixl"),
        ]
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == single_machine
        totals = c.stats().transfers
        assert totals.num_transfers == len(PROMPTS) and totals.num_failures == 0
        assert totals.transport == "nixl"


def test_mixed_pairs_choose_their_transport(fake_cluster, single_machine):
    """2P2D on 2 nodes: each instance has a peer on its node (shm) and one on the other
    (nixl); the choice is per pair."""
    placement = Placement.disaggregated(PhaseConfig(num_instances=2), PhaseConfig(num_instances=2))
    with Controller(engine_config(), placement, _ray(fake_cluster, (0, 1, 0, 1))) as c:
        assert {h.spec.transport for h in c.instances} == {"shm+nixl"}
        decode1 = c.instances[3]
        assert decode1.pair_transports == {0: "nixl", 1: "shm"}
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == single_machine
        assert c.stats().transfers.num_failures == 0
        assert c.stats().transfers.transport == "shm+nixl"


def test_placement_the_cluster_cannot_hold_is_refused_in_one_line(fake_cluster):
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig())
    with pytest.raises(ValueError, match=r"names node 5; the cluster has 2") as e:
        Controller(engine_config(), placement, _ray(fake_cluster, (0, 5)))
    assert "\n" not in str(e.value)


def test_gpu_on_ray_not_built(fake_cluster):
    from distserve_rt.engine.disagg.ray_launcher import check_ray_config

    with pytest.raises(NotImplementedError, match="GPU instances on Ray"):
        check_ray_config(engine_config(device="cuda"), DisaggConfig(launcher="ray"), None)


LOAD_TOKENS = 24


def test_node_lost_mid_load_no_request_hangs(fake_cluster):
    """1 prefill + 1 decode on node 0, 1 decode on node 1; node 1 is killed (its processes
    SIGKILLed, as a lost machine) while it decodes. Every request ends: its tokens equal the
    single-machine run's (finished, or re-prefilled on node 0), or it fails with a message;
    none hangs."""
    reference = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        reference.add_request(str(i), p, greedy(LOAD_TOKENS))
    expected = {}
    while reference.has_unfinished_requests():
        expected.update({o.request_id: o.outputs[0].token_ids for o in reference.step()})
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=2))
    config = _ray(fake_cluster, (0, 0, 1), retry_on_instance_failure=True, max_retries=2)
    try:
        with Controller(engine_config(), placement, config) as c:
            for i in range(2 * len(PROMPTS)):
                c.add_request(f"{i}", PROMPTS[i % len(PROMPTS)], greedy(LOAD_TOKENS))
            outputs, deadline = {}, time.monotonic() + 60
            on_node1 = lambda: any(  # noqa: E731
                t.decode_index == 1 and t.phase is Phase.DECODING for t in c.requests.values()
            )
            while not on_node1():
                assert time.monotonic() < deadline, "no request reached node 1's decode"
                outputs.update({o.request_id: o for o in c.step(0.01) if o.finished})
            fake_cluster.command(f"remove {WORKER_IP}")
            while c.has_unfinished_requests():
                assert time.monotonic() < deadline, f"hung: {sorted(c.requests)} unfinished"
                outputs.update({o.request_id: o for o in c.step(0.01) if o.finished})
            decode1 = c.instances[2]
            assert not decode1.alive
            assert len(outputs) == 2 * len(PROMPTS)
            for request_id, out in outputs.items():
                done = out.outputs[0]
                if done.finish_reason == "error":
                    assert "decode-1 died" in (out.error or ""), out
                else:
                    assert done.token_ids == expected[str(int(request_id) % len(PROMPTS))]
    finally:
        fake_cluster.command(f"add {WORKER_IP}")

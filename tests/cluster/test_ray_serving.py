"""Disaggregated serving with launcher="ray" on the fake 2-node cluster: instances placed
on the nodes asked for, KV pulled through nixl between nodes and shm within one, greedy
tokens equal to the single-machine (colocated) run, and a node lost under load. (Prefill
TP=2 on node 0 -> decode on node 1 through nixl alone: test_ray_placement_file.py.)"""

from __future__ import annotations

import time

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from tests.cluster.conftest import MAX_TOKENS, WORKER_IP
from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy, run, settle

pytestmark = pytest.mark.timeout(90)


def _ray(fake_cluster, nodes, **kw) -> DisaggConfig:
    return DisaggConfig(
        launcher="ray", ray_address=fake_cluster.address, instance_nodes=nodes,
        placement_timeout_s=20, startup_timeout_s=60, **kw,
    )  # fmt: skip


def test_placement_the_cluster_cannot_hold_is_refused_in_one_line(fake_cluster):
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig())
    with pytest.raises(ValueError, match=r"names node 5; the cluster has 2") as e:
        Controller(engine_config(), placement, _ray(fake_cluster, (0, 5)))
    assert "\n" not in str(e.value)


def test_gpu_on_ray_not_built(fake_cluster):
    from distserve_rt.engine.disagg.ray_launcher import check_ray_config

    with pytest.raises(NotImplementedError, match="GPU instances on Ray"):
        check_ray_config(engine_config(device="cuda"), DisaggConfig(launcher="ray"), None)


LOAD_TOKENS = 400
"""Long enough (seconds of decode) that requests are still decoding on node 1 when it is
killed: at 48 tokens they sometimes all finished while the node was being removed."""
LOAD_CONFIG = dict(max_model_len=512, kv_cache_memory_bytes=32 << 20)


def _single_machine(max_tokens: int) -> list[list[int]]:
    engine = LLMEngine(engine_config(**LOAD_CONFIG))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(max_tokens))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [outputs[str(i)] for i in range(len(PROMPTS))]


def _step_until(c: Controller, outputs: dict, done, deadline: float, what: str) -> None:
    while not done():
        assert time.monotonic() < deadline, what
        outputs.update({o.request_id: o for o in c.step(0.01) if o.finished})


def test_mixed_pairs_then_node_lost_mid_load(fake_cluster, single_machine):
    """2P2D on 2 nodes: each instance has a peer on its node (shm) and one on the other
    (nixl); the transport is chosen per pair, and tokens equal the single-machine run.
    Then node 1 is killed (its processes SIGKILLed, as a lost machine) while it decodes:
    every request ends with the single-machine tokens (finished, or re-prefilled on node
    0) or fails with a message (the dead instance, or the pull from it); none hangs."""
    reference = _single_machine(LOAD_TOKENS)
    placement = Placement.disaggregated(PhaseConfig(num_instances=2), PhaseConfig(num_instances=2))
    config = _ray(fake_cluster, (0, 1, 0, 1), retry_on_instance_failure=True, max_retries=2)
    with Controller(engine_config(**LOAD_CONFIG), placement, config) as c:
        assert {h.spec.transport for h in c.instances} == {"shm+nixl"}
        # [decode rank][prefill rank]: one rank each side, on different nodes or one.
        assert c.instances[3].rank_transports == {0: (("nixl",),), 1: (("shm",),)}
        outputs = run(c, max_tokens=MAX_TOKENS)
        assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == single_machine
        # The counters come with the instances' periodic reports: wait for the last one.
        settle(c, lambda: c.stats().transfers.num_transfers >= len(PROMPTS))
        totals = c.stats().transfers
        assert totals.transport == "shm+nixl" and totals.num_failures == 0
        assert totals.num_transfers == len(PROMPTS)

        outputs, deadline = {}, time.monotonic() + 60
        tracked = []
        for i in range(2 * len(PROMPTS)):
            c.add_request(f"load-{i}", PROMPTS[i % len(PROMPTS)], greedy(LOAD_TOKENS))
            tracked.append(c.requests[f"load-{i}"])
        on_node1 = lambda: any(  # noqa: E731
            t.decode_index == 1 and t.phase is Phase.DECODING for t in c.requests.values()
        )
        _step_until(c, outputs, on_node1, deadline, "no request reached node 1's decode")
        fake_cluster.remove_node(WORKER_IP)
        lost = lambda: not (c.instances[1].alive or c.instances[3].alive)  # noqa: E731
        _step_until(c, outputs, lost, deadline, "node 1's instances not declared dead")
        _step_until(c, outputs, lambda: not c.has_unfinished_requests(), deadline, "hung")
        assert [h.alive for h in c.instances] == [True, False, True, False]
        failed = [o for o in outputs.values() if o.outputs[0].finish_reason == "error"]
        assert failed or any(t.num_retries for t in tracked)  # the loss hit requests
        assert len(outputs) == 2 * len(PROMPTS)
        for request_id, out in outputs.items():
            if out.outputs[0].finish_reason == "error":
                # Its instance died, or it was being pulled from the dead prefill.
                error = out.error or ""
                assert "-1 died" in error or "KV transfer failed" in error, out
            else:
                want = reference[int(request_id.split("-")[1]) % len(PROMPTS)]
                assert out.outputs[0].token_ids == want

"""The disaggregated runtime with KV moved by the nixl transport (NIXL READ over UCX TCP, the
path between nodes) between spawned instance processes: dummy:llama-tiny gives the tokens
of the shm transport, also when decode runs TP = 2 (each decode rank pulls its half of
the KV heads), and the transfer totals name the transport; a prefill process killed
mid-run (a pull from it in flight fails in NIXL) has its requests retried elsewhere, as
over shm."""

from __future__ import annotations

import os
import signal

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.llm_engine import LLMEngine
from tests.engine.disagg_helpers import (
    PROMPTS,
    drain,
    engine_config,
    greedy,
    run,
    settle,
    token_ids,
)
from tests.transfer.peer_process import ucx_over_tcp

MAX_TOKENS = 8


def _tokens_and_transfers(transport: str, placement: Placement):
    dc = DisaggConfig(transport=transport, pin_cpus=False)
    with Controller(engine_config(), placement, dc) as c:
        outputs = run(c, max_tokens=MAX_TOKENS)
        settle(c, lambda: c.stats().transfers.num_transfers == len(PROMPTS), timeout_s=30.0)
        return token_ids(outputs), c.stats().transfers


@pytest.fixture(scope="module")
def shm_run():
    return _tokens_and_transfers("shm", Placement.disaggregated(PhaseConfig(), PhaseConfig()))


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_nixl_tokens_equal_shm(shm_run, decode_tp):
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(tp=decode_tp))
    shm_tokens, shm_totals = shm_run  # TP = 2 gives the tokens of TP = 1 (test_parallel_engine)
    with ucx_over_tcp():
        nixl_tokens, nixl_totals = _tokens_and_transfers("nixl", placement)
    assert nixl_tokens == shm_tokens
    assert (shm_totals.transport, nixl_totals.transport) == ("shm", "nixl")
    assert nixl_totals.num_failures == 0 and nixl_totals.bytes == shm_totals.bytes > 0


def test_killed_prefill_requests_are_retried_elsewhere_over_nixl():
    engine = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(40))
    reference = {}
    while engine.has_unfinished_requests():
        reference.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
    placement = Placement.disaggregated(PhaseConfig(num_instances=2), PhaseConfig())
    dc = DisaggConfig(transport="nixl", pin_cpus=False, retry_on_instance_failure=True)
    with ucx_over_tcp(), Controller(engine_config(), placement, dc) as c:
        for i, p in enumerate(PROMPTS * 2):
            c.add_request(str(i), p, greedy(40))
        assert any(r.prefill_index == 0 for r in c.requests.values())
        os.kill(c.prefill(0).pid, signal.SIGKILL)
        outputs = drain(c, timeout_s=60)
        for i in range(2 * len(PROMPTS)):
            assert outputs[str(i)].outputs[0].token_ids == reference[str(i % len(PROMPTS))]
        assert [s.alive for s in c.stats().instances] == [False, True, True]

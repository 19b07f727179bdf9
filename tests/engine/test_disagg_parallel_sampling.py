"""n > 1 and best_of on the disaggregated controller: the parent fans out into n == 1 child
requests (`disagg/fanout.py`) whose outputs are gathered as the colocated engine presents a
group: greedy copies, derived seeds (sequence 0 is the n == 1 output), best_of ranking equal
to the colocated engine's, one output per parent, streaming by index, abort of the parent,
a failing child that fails only its sequence, and child ids no user id can take. Instances
run on threads (real shm transfers)."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.disagg import recovery
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.tracking import Phase
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from tests.engine.disagg_helpers import PROMPTS, drain, engine_config, greedy, kv_idle, settle


@pytest.fixture(scope="module")
def controller():
    c = make_engine_core(engine_config(), "disaggregated", DisaggConfig(launcher="thread"))
    assert isinstance(c, Controller)
    yield c
    c.shutdown()


def _sampled(seed: int = 7, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed, **kw)


def _outputs(engine, request_id, prompt, params, stream=False) -> list[RequestOutput]:
    """Every output the engine returns for the request, in order (the last finished)."""
    engine.add_request(request_id, prompt, params, stream=stream)
    outputs = []
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            assert outputs and outputs[-1].finished, outputs
            return outputs
        outputs += [o for o in engine.step(0.01) if o.request_id == request_id]
    raise AssertionError(f"not finished: {outputs}")


def _final(engine, request_id, prompt, params) -> RequestOutput:
    outputs = _outputs(engine, request_id, prompt, params)
    assert len(outputs) == 1  # not streaming: one output, when every sequence finished
    return outputs[0]


def test_greedy_n_gives_n_copies_of_the_n1_output(controller):
    single = _final(controller, "one", PROMPTS[1], greedy(8)).outputs[0]
    out = _final(controller, "three", PROMPTS[1], SamplingParams(n=3, **_greedy_kw()))
    assert out.request_id == "three" and out.finished and out.error is None
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == single.token_ids and len(c.token_ids) == 8 for c in out.outputs)
    assert {c.finish_reason for c in out.outputs} == {"length"}
    assert not controller.fan_outs and not controller.requests
    settle(controller, lambda: kv_idle(controller))


def _greedy_kw() -> dict:
    return dict(temperature=0, max_tokens=8, ignore_eos=True)


def test_seeded_n_is_reproducible_and_sequence_0_is_the_n1_output(controller):
    single = _final(controller, "s", PROMPTS[2], _sampled()).outputs[0].token_ids
    first = _final(controller, "a", PROMPTS[2], _sampled(n=2))
    again = _final(controller, "b", PROMPTS[2], _sampled(n=2))
    tokens = [c.token_ids for c in first.outputs]
    assert tokens == [c.token_ids for c in again.outputs]
    assert tokens[0] == single and tokens[1] != single  # sequence 1 has its own seed


def test_best_of_returns_the_colocated_engines_best_sequence(controller):
    colocated = make_engine_core(engine_config())
    assert isinstance(colocated, LLMEngine)
    params = _sampled(seed=9, best_of=3)  # on PROMPTS[3], sequence 2 ranks first
    want = _final(colocated, "x", PROMPTS[3], params).outputs
    got = _final(controller, "x", PROMPTS[3], params).outputs
    assert len(got) == 1 and got[0].index == 0 and got[0].logprobs is None
    assert got[0].token_ids == want[0].token_ids
    assert got[0].cumulative_logprob == pytest.approx(want[0].cumulative_logprob, abs=1e-3)
    # The ranking chose: sequence 0 (the n == 1 output) is not the best one here.
    sequence_0 = _final(controller, "y", PROMPTS[3], _sampled(seed=9)).outputs[0]
    assert got[0].token_ids != sequence_0.token_ids


def test_streamed_n_shows_every_sequence_by_index_and_finishes_once(controller):
    outputs = _outputs(controller, "st", PROMPTS[0], _sampled(n=2), stream=True)
    assert len(outputs) > 2 and not any(o.finished for o in outputs[:-1])
    assert all([c.index for c in o.outputs] == [0, 1] for o in outputs)
    final = _final(controller, "nst", PROMPTS[0], _sampled(n=2))
    assert [c.token_ids for c in outputs[-1].outputs] == [c.token_ids for c in final.outputs]


def test_aborting_the_parent_aborts_every_child(controller):
    controller.add_request("ab", PROMPTS[4], SamplingParams(n=3, temperature=0, max_tokens=200))
    settle(controller, lambda: all(_decoding(controller, f"ab{s}") for s in ("", "#1", "#2")))
    assert controller.abort_request("ab") and not controller.abort_request("ab")
    out = [o for o in controller.step(0.01) if o.request_id == "ab"]
    assert len(out) == 1 and out[0].finished
    assert [c.finish_reason for c in out[0].outputs] == ["abort"] * 3
    assert all(len(c.token_ids) < 200 for c in out[0].outputs)
    assert not controller.requests and not controller.fan_outs
    settle(controller, lambda: kv_idle(controller))


def _decoding(controller: Controller, request_id: str) -> bool:
    tracked = controller.requests.get(request_id)
    return tracked is not None and tracked.phase is Phase.DECODING


def test_child_ids_never_collide_with_user_ids(controller):
    controller.add_request("c", PROMPTS[0], SamplingParams(n=2, **_greedy_kw()))
    with pytest.raises(ValueError, match=r"request_id 'c#1' is already in use"):
        controller.add_request("c#1", PROMPTS[0], greedy(8))
    controller.add_request("d#1", PROMPTS[0], greedy(8))
    with pytest.raises(ValueError, match=r"request_id 'd#1' \(a sequence of 'd'\) is in use"):
        controller.add_request("d", PROMPTS[0], SamplingParams(n=2, **_greedy_kw()))
    assert controller.num_unfinished_requests == 2  # the parent counts once
    for _ in range(10_000):
        if not controller.has_unfinished_requests():
            break
        controller.step(0.01)
    assert not controller.fan_outs


def test_a_failing_child_fails_only_its_sequence():
    plan = FaultPlan(fail_transfers={"f#1"})
    config = DisaggConfig(launcher="thread")
    with Controller(engine_config(), Placement.disaggregated(), config, fault_plan=plan) as c:
        out = _final(c, "f", PROMPTS[1], SamplingParams(n=3, **_greedy_kw()))
        assert [o.finish_reason for o in out.outputs] == ["length", "error", "length"]
        assert "KV transfer failed: injected failure" in out.error
        assert len(out.outputs[0].token_ids) == 8 and len(out.outputs[1].token_ids) == 1
        settle(c, lambda: kv_idle(c))


def test_a_dead_decode_instance_fails_only_the_sequence_it_held():
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=2))
    # Least-loaded routing (not cache-aware): the two children go to different instances.
    config = DisaggConfig(launcher="thread", decode_prefix_caching=False)
    with Controller(engine_config(), placement, config) as c:
        c.add_request("g", PROMPTS[1], SamplingParams(n=2, temperature=0, max_tokens=200))
        settle(c, lambda: _decoding(c, "g") and _decoding(c, "g#1"))
        held = c.requests["g#1"].decode_index
        assert c.requests["g"].decode_index != held  # the children went to both instances
        recovery.on_instance_death(c, c.decode(held), "declared dead by the test")
        out = drain(c)["g"]
        assert [o.finish_reason for o in out.outputs] == ["length", "error"]
        assert f"decode-{held} died" in out.error and len(out.outputs[0].token_ids) == 200

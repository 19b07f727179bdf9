"""One bad request never fails its batch-mates: a step that raises is narrowed down to the
request that fails alone (`engine.step_isolation`), in the colocated engine (both policies,
chunked prefill included) and in the prefill and decode instances; every other request's
tokens equal a run without the poison (greedy and seeded, so a re-run that advanced a
seeded stream twice would show). Also: the whole documented seed range runs end to end."""

from __future__ import annotations

import re

import pytest

from distserve_rt import SamplingParams
from distserve_rt.config import DisaggConfig, Placement
from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.step_isolation import batch_requests
from distserve_rt.worker.executor import UniprocExecutor
from tests.engine.disagg_helpers import PROMPTS as TINY_PROMPTS
from tests.engine.disagg_helpers import drain, engine_config
from tests.engine.fakes import FakeCausalLM
from tests.engine.test_engine_fake_model import BLOCK_BYTES, PROMPTS

MODEL = FakeCausalLM()
POISON = "poison"


def _params(i: int) -> SamplingParams:
    # Greedy and seeded rows (seeds in the upper half of the 64-bit range) side by side.
    if i % 2:
        return SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=2**63 + i)
    return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


class PoisonExecutor(UniprocExecutor):
    """Raises in every step that computes a row of `POISON`: before the model runs, or,
    with `after_sampling`, once the whole batch sampled (its seeded streams have drawn)."""

    def __init__(self, worker, after_sampling: bool) -> None:
        super().__init__(worker)
        self.after_sampling = after_sampling
        self.num_mixed_failures = 0  # failed steps that held other requests too

    def execute(self, scheduler_output):
        ids = {r.request_id for r in batch_requests(scheduler_output)}
        if POISON in ids and not self.after_sampling:
            self._fail(ids)
        output = super().execute(scheduler_output)
        if POISON in ids:
            self._fail(ids)
        return output

    def _fail(self, ids: set[str]) -> None:
        self.num_mixed_failures += len(ids) > 1
        raise RuntimeError("device fault\nsecond line of the message")


def _engine(policy: str, budget: int | None) -> LLMEngine:
    config = EngineConfig(
        model="fake",
        policy=policy,
        block_size=8,
        max_num_batched_tokens=budget,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 * BLOCK_BYTES,
        log_stats_interval_s=0,
    )
    return LLMEngine(config, model=MODEL)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    raise AssertionError(f"not finished: {outputs}")


def _innocents() -> dict[str, tuple[list[int], SamplingParams]]:
    return {str(i): (p, _params(i)) for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("after_sampling", [False, True])
@pytest.mark.parametrize(
    ("policy", "budget"), [("continuous_batching", None), ("chunked_prefill", 9)]
)
def test_a_poison_request_fails_alone_in_the_colocated_engine(policy, budget, after_sampling):
    expected = _run(_engine(policy, budget), _innocents())
    engine = _engine(policy, budget)
    engine.executor = PoisonExecutor(engine.executor.worker, after_sampling)
    requests = _innocents()
    # In the middle of the queue: batched with requests before and after it.
    requests = dict(list(requests.items())[:3] + [(POISON, ([4, 6, 8, 10, 12], _params(1)))]
                    + list(requests.items())[3:])  # fmt: skip
    outputs = _run(engine, requests)

    assert engine.executor.num_mixed_failures >= 1  # isolation really had work to do
    poison = outputs.pop(POISON)
    assert poison.outputs[0].finish_reason == "error"
    assert poison.error == (
        "request 'poison' failed the engine step on its own: RuntimeError: device fault"
    )
    got = {k: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for k, o in outputs.items()}
    want = {k: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for k, o in expected.items()}
    assert got == want
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()


class OutOfVocabExecutor(UniprocExecutor):
    """Returns an id past the vocabulary for `POISON` (what NaN probabilities sample)."""

    def execute(self, scheduler_output):
        output = super().execute(scheduler_output)
        for i, r in enumerate(scheduler_output.sampling_requests()):
            if r.request_id == POISON:
                output.sampled_token_ids[i] = MODEL.config.vocab_size
        return output


def test_a_token_past_the_vocabulary_fails_only_its_request():
    expected = _run(_engine("chunked_prefill", 16), _innocents())
    engine = _engine("chunked_prefill", 16)
    engine.executor = OutOfVocabExecutor(engine.executor.worker)
    outputs = _run(engine, {POISON: ([3, 4, 5], _params(0)), **_innocents()})
    poison = outputs.pop(POISON)
    assert poison.outputs[0].finish_reason == "error"
    assert "sampled token id 64, outside the vocabulary [0, 64)" in poison.error
    assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == {
        k: o.outputs[0].token_ids for k, o in expected.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt=""), "prompt must be a non-empty string"),
        (dict(sampling_params=SamplingParams(min_tokens=2, stop_token_ids=list(range(64)))),
         "suppress all 64 tokens"),
        (dict(prompt_token_ids=[3, 64]), r"prompt_token_ids must be ints in \[0, 64\), got 64"),
        (dict(prompt_token_ids=[]), "prompt_token_ids must not be empty"),
    ],
)  # fmt: skip
def test_admission_refuses_what_would_fail_a_step(kwargs, match):
    engine = _engine("chunked_prefill", 16)
    args = dict(prompt_token_ids=[3, 4], sampling_params=SamplingParams()) | kwargs
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", **args)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("field", ["temperature", "seed"])
def test_sampling_params_refuse_values_the_sampler_cannot_take(field):
    value = {"temperature": 1e39, "seed": 2**64}[field]
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


# ---- the disaggregated instances --------------------------------------------------------

POISON_PREFILL, POISON_DECODE = "poison-prefill", "poison-decode"


def _poisoned_execute(execute):
    """Fails prefill batches holding POISON_PREFILL and decode batches holding
    POISON_DECODE (so the latter's first token, from its prefill, arrives first)."""

    def execute_with_poison(self, scheduler_output):
        prefill_ids = {p.request.request_id for p in scheduler_output.prefills}
        decode_ids = {r.request_id for r in scheduler_output.decodes}
        if POISON_PREFILL in prefill_ids or POISON_DECODE in decode_ids:
            raise RuntimeError("device fault")
        return execute(self, scheduler_output)

    return execute_with_poison


def _tiny_requests(n: int) -> dict[str, tuple[list[int], SamplingParams]]:
    return {str(i): (TINY_PROMPTS[i % len(TINY_PROMPTS)], _params(i)) for i in range(n)}


def test_poison_requests_fail_alone_on_prefill_and_decode_instances(monkeypatch):
    innocents = _tiny_requests(8)
    expected = _run(LLMEngine(engine_config()), innocents)
    monkeypatch.setattr(UniprocExecutor, "execute", _poisoned_execute(UniprocExecutor.execute))
    poisons = {POISON_PREFILL: (TINY_PROMPTS[0], _params(0)),
               POISON_DECODE: (TINY_PROMPTS[1], _params(1))}  # fmt: skip
    with Controller(
        engine_config(), Placement.disaggregated(), DisaggConfig(launcher="thread")
    ) as controller:
        for request_id, (prompt, params) in (poisons | innocents).items():
            controller.add_request(request_id, prompt, params)
        outputs = drain(controller)
        assert all(h.alive for h in controller.prefills(alive_only=False))
        assert all(h.alive for h in controller.decodes(alive_only=False))

    for request_id in poisons:
        failed = outputs.pop(request_id)
        assert failed.outputs[0].finish_reason == "error"
        assert failed.error == (
            f"request {request_id!r} failed the engine step on its own: RuntimeError: device fault"
        )
    assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == {
        k: o.outputs[0].token_ids for k, o in expected.items()
    }


def test_the_whole_64_bit_seed_range_runs_colocated_and_disaggregated():
    seeds = [0, 2**63 - 1, 2**63, 2**63 + 5, 2**64 - 1]
    requests = {
        str(i): (TINY_PROMPTS[i], SamplingParams(temperature=1.0, max_tokens=6, seed=s))
        for i, s in enumerate(seeds)
    }
    colocated = _run(LLMEngine(engine_config()), requests)
    with Controller(
        engine_config(), Placement.disaggregated(), DisaggConfig(launcher="thread")
    ) as controller:
        disaggregated = _run(controller, requests)
    assert all(o.outputs[0].finish_reason != "error" for o in colocated.values())
    assert {k: o.outputs[0].token_ids for k, o in disaggregated.items()} == {
        k: o.outputs[0].token_ids for k, o in colocated.items()
    }

"""Driving a `Controller` in tests: configs, run to completion with a deadline."""

from __future__ import annotations

import time

from distserve_rt.config import EngineConfig
from distserve_rt.engine.controller import Controller
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams

PROMPTS = [[3 + (7 * i + 5 * j) % 500 for j in range(6 + 9 * i)] for i in range(5)]


def engine_config(**overrides) -> EngineConfig:
    fields = dict(
        model="dummy:llama-tiny",
        block_size=8,
        max_model_len=256,
        kv_cache_memory_bytes=8 << 20,
        log_stats_interval_s=0,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run(
    controller: Controller, prompts=PROMPTS, max_tokens: int = 8, timeout_s: float = 60.0
) -> dict[str, RequestOutput]:
    for i, p in enumerate(prompts):
        controller.add_request(str(i), p, greedy(max_tokens))
    return drain(controller, timeout_s)


def drain(controller: Controller, timeout_s: float = 60.0) -> dict[str, RequestOutput]:
    deadline = time.monotonic() + timeout_s
    outputs: dict[str, RequestOutput] = {}
    while controller.has_unfinished_requests():
        assert time.monotonic() < deadline, f"not finished after {timeout_s} s: {outputs}"
        for out in controller.step(0.01):
            if out.finished:
                outputs[out.request_id] = out
    return outputs


def settle(controller: Controller, predicate, timeout_s: float = 10.0) -> None:
    """Steps until `predicate()` holds (load reports arrive every stats_interval_s)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        controller.step(0.01)


def token_ids(outputs: dict[str, RequestOutput]) -> list[list[int]]:
    return [outputs[str(i)].outputs[0].token_ids for i in range(len(outputs))]


def kv_idle(controller: Controller) -> bool:
    """Every live instance reports an empty KV pool and no request."""
    stats = controller.stats().instances
    return all(s.kv_usage == 0 and s.num_running == 0 and s.num_waiting == 0 for s in stats)

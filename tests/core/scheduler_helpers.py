"""Drive a scheduler the way an engine (or the simulator) does, without a model."""

from __future__ import annotations

import itertools

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import SchedulerConfig, make_scheduler
from distserve_rt.sampling_params import SamplingParams
from tests.engine.fakes import check_scheduler_output, history_token

_ids = itertools.count()


def make(policy: str, num_blocks: int = 64, block_size: int = 8, watermark: float = 0.0, **cfg):
    bm = BlockManager(num_blocks, block_size, watermark)
    cfg.setdefault("max_model_len", 128)
    cfg.setdefault("max_num_batched_tokens", 128)
    cfg.setdefault("max_num_seqs", 8)
    return make_scheduler(policy, SchedulerConfig(**cfg), bm), bm


def request(num_prompt: int, max_tokens: int = 4, arrival: float = 0.0, max_model_len=128):
    seq_id = next(_ids)
    prompt = [3 + (seq_id * 7 + i) % 50 for i in range(num_prompt)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Request(f"r{seq_id}", seq_id, prompt, params, arrival, max_model_len)


def step(scheduler, bm, now: float = 0.0):
    """One step: schedule, check the bookkeeping, append history tokens, finish by length."""
    out = scheduler.schedule(now)
    check_scheduler_output(out, bm)
    for r in out.sampling_requests():
        r.append_token(history_token(r.token_ids), now)
        if r.num_tokens >= r.max_num_tokens:
            scheduler.finish_request(r, RequestStatus.FINISHED_LENGTH, now)
    return out


def run_to_completion(scheduler, bm, max_steps: int = 10_000) -> int:
    for num_steps in range(1, max_steps + 1):
        step(scheduler, bm, float(num_steps))
        if not scheduler.has_unfinished_requests():
            return num_steps
    raise AssertionError(f"not finished after {max_steps} steps")


def unconstrained_tokens(req: Request) -> list[int]:
    """The output the history-token executor gives when nothing is ever preempted."""
    tokens = list(req.prompt_token_ids)
    while len(tokens) < req.max_num_tokens:
        tokens.append(history_token(tokens))
    return tokens[req.num_prompt_tokens :]

"""The scheduler seam: what a policy is given, what it decides, and what it promises.

A scheduler owns the request queues and the `BlockManager`; the engine owns the clock and
the model. Every step::

    output = scheduler.schedule(now)          # decide, reserve KV slots, commit progress
    ... the executor runs output (prepare inputs -> model -> sample) ...
    engine appends the sampled tokens and calls scheduler.finish_request(...) for stops

Contract (every policy, tested by tests/core):

* `schedule` reads no clock (``now`` is passed in) and touches no tensor or model: a
  simulator drives the same classes with a latency model in place of the executor.
* Everything a scheduled request needs from the KV pool is reserved inside `schedule`:
  ``slot_mapping`` covers every scheduled token, block tables and seq_lens include them.
* Progress is committed at schedule time: a scheduled chunk's tokens count in
  ``request.num_computed_tokens`` when `schedule` returns (as vLLM v1 does), so the next
  `schedule` may run before the step's tokens are appended (no token is lost either way,
  because a decode is scheduled only once its previous token is appended).
* No request is lost: each live request is in exactly one queue, or finished and reported
  once in ``SchedulerOutput.finished`` (abort and rejection) or by the engine (stops).
* Blocks are conserved: a finished or preempted request holds no block.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distserve_rt.config.scheduler import SchedulerConfig
from distserve_rt.core.block_manager import BlockManagerStats
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.logprobs import Logprob

_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_EMPTY_I32 = np.zeros(0, dtype=np.int32)


@dataclass(slots=True)
class ScheduledPrefill:
    """A prefill chunk: tokens ``prefix_len .. prefix_len + num_new_tokens - 1``."""

    request: Request
    num_new_tokens: int
    prefix_len: int
    """Tokens of the request already in the KV cache before this chunk."""
    produces_token: bool
    """Whether this is the last chunk (its last row's logits give the next token)."""
    forks: list[Request] = field(default_factory=list)
    """Sequences forked off the request at this chunk (parallel sampling): each samples
    its first token from the same logits row, after the request's own row."""


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch. Token order: prefill chunks (in list order), then decodes."""

    prefills: list[ScheduledPrefill] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    """Requests computing one token (their last) and sampling the next."""
    preempted: list[Request] = field(default_factory=list)
    """Preempted by recompute this step (KV dropped, back at the front of the queue)."""
    finished: list[Request] = field(default_factory=list)
    """Finished inside the scheduler since the last step (aborted, rejected)."""
    slot_mapping: np.ndarray = field(default_factory=lambda: _EMPTY_I64)
    """int64 [num_tokens]: KV slot of every scheduled token, in token order."""
    prefill_block_tables: np.ndarray | None = None
    """int32 [num_prefills, max_blocks]; None when no chunk has a prefix in the cache."""
    decode_block_tables: np.ndarray = field(default_factory=lambda: _EMPTY_I32.reshape(0, 0))
    """int32 [num_decodes, max_blocks], rows padded with block 0."""
    decode_seq_lens: np.ndarray = field(default_factory=lambda: _EMPTY_I32)
    """int32 [num_decodes]: cached tokens including this step's new one."""
    num_prefill_tokens: int = 0
    block_copies: np.ndarray = field(default_factory=lambda: _EMPTY_I64.reshape(0, 2))
    """int64 [num_pairs, 2]: copy-on-write (src block, dst block) pairs of the decodes'
    appends: the runner copies them (``ops.copy_blocks``) before the step writes any KV."""

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        """Nothing to run (the step may still report finished/preempted requests)."""
        return not self.prefills and not self.decodes

    def sampling_requests(self) -> list[Request]:
        """Requests that get a token this step, in the executor's output row order."""
        out = []
        for p in self.prefills:
            if p.produces_token:
                out.append(p.request)
                out += p.forks
        out += self.decodes
        return out


@dataclass(slots=True)
class StepUpdate:
    """What `Scheduler.update_from_output` did with a step's sampled tokens."""

    updated: list[Request] = field(default_factory=list)
    """Requests that got a token, in the batch's row order (finished ones included)."""
    finished: list[Request] = field(default_factory=list)
    """Those of them that stopped at it (finished, blocks freed)."""


class Scheduler(abc.ABC):
    """A batching policy over one instance's queues and KV blocks."""

    config: SchedulerConfig

    @abc.abstractmethod
    def add_request(self, request: Request) -> None:
        """Queues a new request (status WAITING). One that can never be served (prompt too
        long) is finished with FINISHED_ERROR and reported by the next `schedule`."""

    @abc.abstractmethod
    def schedule(self, now: float) -> SchedulerOutput:
        """Decides this step's batch (see the module docstring for the contract)."""

    @abc.abstractmethod
    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Sequence[int],
        logprobs: Sequence[dict[int, Logprob] | None] | None,
        now: float,
    ) -> StepUpdate:
        """Takes the step's sampled tokens (one per `output.sampling_requests()` row): each
        is appended to its request, the request's `StopChecker` applies the stop rules, and
        a request that stopped is finished here. Every engine and instance ends its step
        through this (vLLM's ``Scheduler.update_from_output``)."""

    @abc.abstractmethod
    def finish_request(self, request: Request, status: RequestStatus, now: float) -> None:
        """The engine saw a stop: the request leaves its queue and frees its blocks."""

    @abc.abstractmethod
    def abort_request(self, request_id: str, now: float) -> Request | None:
        """Removes a live request wherever it is (FINISHED_ABORTED, blocks freed); it is
        reported by the next `schedule`. Returns it, or None when the id is not live."""

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_running(self) -> int: ...

    @abc.abstractmethod
    def has_unfinished_requests(self) -> bool:
        """Whether a live request or an unreported finish remains."""

    @abc.abstractmethod
    def kv_stats(self) -> BlockManagerStats: ...

"""Closed-loop arrivals of multi-turn conversations for the scheduler-driven simulators.

A turn arrives ``think_s`` after the previous turn of its conversation finished, with the
prompt `workloads.multi_turn.next_prompt` builds from that turn's prompt and answer (the
simulated answer's token ids: the same id repeated, as the runtime's would be whatever the
model said; only the prefix structure matters to the cache). Requests get indices in
arrival order, so the result arrays are in arrival order as for a fixed trace.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.planner.simulator.driven_instance import make_request
from distserve_rt.planner.simulator.results import SimResult
from distserve_rt.workloads.multi_turn import MultiTurnWorkload, next_prompt

_INF = float("inf")


@dataclass(frozen=True, eq=False)
class ConversationSimResult:
    """A closed-loop run: the per-request result (arrival order) and the prefix cache."""

    result: SimResult
    conversation_ids: np.ndarray  # [num_requests] int64
    turn_indices: np.ndarray  # [num_requests] int64, 0 = first turn
    prompt_lens: np.ndarray  # [num_requests] int64
    prefix_cache_queries: int
    """Prompt tokens looked up in the cache (the runtime's counter, summed over instances)."""
    prefix_cache_hits: int
    """Prompt tokens found there (their prefill compute skipped)."""
    instance_prefix_cache_queries: tuple[int, ...] = ()
    instance_prefix_cache_hits: tuple[int, ...] = ()
    """The two counters per instance (disaggregated: prefill instances first, then decode
    instances, whose lookups are the migrations' admissions and local prefills)."""
    num_blocks_pulled: int = 0
    num_blocks_reused: int = 0
    """Disaggregated: of the migrations' KV blocks, those pulled and those the decode
    instance had cached (`DecodeInstance`'s counters, summed)."""
    num_local_prefills: int = 0
    """Disaggregated: requests prefilled on a decode instance (conditional disaggregation)."""

    @property
    def hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


def context_len(workload: MultiTurnWorkload, max_model_len: int | None) -> int:
    """The context length of a conversation replay: ``max_model_len``, else the longest
    turn (prompt + output); ValueError for another workload or a shorter context."""
    if not isinstance(workload, MultiTurnWorkload):
        raise ValueError(
            f"workload must be a MultiTurnWorkload (workloads.multi_turn), got "
            f"{type(workload).__name__}; single-turn requests go through run()"
        )
    longest = workload.max_seq_len()
    if max_model_len is not None and max_model_len < longest:
        raise ValueError(
            f"max_model_len ({max_model_len}) must be >= the longest turn's prompt + output "
            f"({longest})"
        )
    return longest if max_model_len is None else max_model_len


class ConversationArrivals:
    """The turns due by a time, and the next turn of each conversation whose turn finished.

    Args:
        workload: the conversations.
        max_model_len: the context length every request gets.
    """

    def __init__(self, workload: MultiTurnWorkload, max_model_len: int) -> None:
        self.workload = workload
        self.max_model_len = max_model_len
        self.requests: list[Request] = []
        """Every turn that arrived, in arrival order (index = seq_id)."""
        self._conv: list[tuple[int, int]] = []  # per request: (conversation index, turn)
        self._prompts: list[list[int]] = []
        self._seq = 0
        # (arrival s, tiebreak, conversation index, turn index, prompt token ids)
        self._pending: list[tuple[float, int, int, int, list[int]]] = []
        for c, conv in enumerate(workload.conversations):
            self._push(conv.start_s, c, 0, next_prompt([], [], conv.turns[0]))

    def _push(self, time: float, c: int, k: int, prompt: list[int]) -> None:
        self._seq += 1
        heapq.heappush(self._pending, (time, self._seq, c, k, prompt))

    def next_arrival(self) -> float:
        """When the next pending turn arrives (s); inf when none is pending."""
        return self._pending[0][0] if self._pending else _INF

    def pop_due(self, now: float) -> list[Request]:
        """The turns arrived by ``now``, as new requests (arrival order)."""
        due = []
        while self._pending and self._pending[0][0] <= now:
            time, _, c, k, prompt = heapq.heappop(self._pending)
            turn = self.workload.conversations[c].turns[k]
            index = len(self.requests)
            request = make_request(
                index, len(prompt), turn.output_len, time, self.max_model_len, prompt
            )
            self.requests.append(request)
            self._conv.append((c, k))
            self._prompts.append(prompt)
            due.append(request)
        return due

    def finished(self, requests: list[Request]) -> None:
        """Queues the next turn of each finished request's conversation; a request that
        failed (never fit the pool) ends its conversation, as a chat client would stop."""
        for request in requests:
            if request.status is RequestStatus.FINISHED_ERROR:
                continue
            c, k = self._conv[request.seq_id]
            turns = self.workload.conversations[c].turns
            if k + 1 < len(turns):
                prompt = next_prompt(
                    self._prompts[request.seq_id], request.output_token_ids, turns[k + 1]
                )
                self._push(request.finished_time + turns[k].think_s, c, k + 1, prompt)

    def result(
        self, sim: SimResult, block_managers: list[BlockManager], **counters: int
    ) -> ConversationSimResult:
        """The run's result; ``counters`` are `ConversationSimResult`'s migration fields."""
        stats = [bm.stats() for bm in block_managers]
        conv = np.asarray(self._conv, dtype=np.int64).reshape(-1, 2)
        return ConversationSimResult(
            sim,
            conv[:, 0].copy(),
            conv[:, 1].copy(),
            np.asarray([len(p) for p in self._prompts], dtype=np.int64),
            sum(s.prefix_cache_queries for s in stats),
            sum(s.prefix_cache_hits for s in stats),
            tuple(s.prefix_cache_queries for s in stats),
            tuple(s.prefix_cache_hits for s in stats),
            **counters,
        )

"""What every policy shares: queues, admission into the KV pool, preemption by recompute,
abort, rejection, and packing a step's KV bookkeeping into a `SchedulerOutput`.

Policies (continuous batching, chunked prefill, and later the disaggregated prefill and
decode schedulers) only decide *which* requests and *how many* tokens; these helpers keep
the invariants (blocks conserved, no request lost, ``num_computed_tokens`` consistent).

Parallel sampling (n > 1, best_of): a request carries its group's other sequences in
``Request.forks``. It is admitted and prefilled alone (its group counts whole against
``max_num_seqs``); the chunk that completes its prompt forks them (`BlockManager.fork`:
they share every prompt block) and they sample from its logits row. From then on each
sequence is an ordinary running request: the first decode that appends into a still
shared block gets a copy-on-write pair (``SchedulerOutput.block_copies``, copied by the
runner before the forward), and preemption recomputes one sequence at a time, its prompt
plus its own tokens (the simplest rule that is correct: sequences no longer depend on each
other once forked; with prefix caching on, the prompt's blocks are found again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from distserve_rt.core.block_manager import AllocStatus, BlockManager, BlockManagerStats
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler.interface import (
    ScheduledPrefill,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StepUpdate,
)
from distserve_rt.logprobs import Logprob


class SchedulerBase(Scheduler):
    """Queues and KV bookkeeping; subclasses implement `schedule`.

    ``waiting``: FCFS deque of WAITING and PREEMPTED requests (preempted ones at the front).
    ``running``: requests holding blocks whose prefill is complete (they decode).
    ``prefilling``: requests holding blocks with a partially computed prefill (chunked).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []
        self._live: dict[str, Request] = {}
        self._finished: list[Request] = []
        # Finished requests are dropped from `running` lazily, once per schedule(), so that
        # finishing k of n requests costs O(n), not O(k * n).
        self._num_stale_running = 0
        # The copy-on-write pairs of this schedule's decode appends (see _reserve_decodes).
        self._block_copies = _NO_COPIES

    # ---- the Scheduler interface ------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._live:
            raise ValueError(f"request_id {request.request_id!r} is already live")
        if request.status is not RequestStatus.WAITING:
            raise ValueError(f"a new request must be WAITING, got {request.status.name}")
        max_len = self.config.max_model_len
        if request.num_prompt_tokens >= max_len:
            # The first generated token must fit the context too, hence >=.
            self._reject(
                request,
                f"prompt has {request.num_prompt_tokens} tokens; it must be shorter than "
                f"max_model_len={max_len}",
                request.arrival_time,
            )
            return
        self._live[request.request_id] = request
        self.waiting.append(request)

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Sequence[int],
        logprobs: Sequence[dict[int, Logprob] | None] | None,
        now: float,
    ) -> StepUpdate:
        requests = output.sampling_requests()
        if len(sampled_token_ids) != len(requests):
            raise ValueError(
                f"sampled_token_ids has {len(sampled_token_ids)} rows; the step has "
                f"{len(requests)} requests that sample"
            )
        if self.block_manager.enable_prefix_caching:
            # Before any request of the step finishes and frees its blocks: freed blocks
            # that were registered stay reusable.
            self._cache_written_blocks(output)
        # The engine's hottest Python loop (every running request, every step): locals only.
        update = StepUpdate()
        updated, finished = update.updated, update.finished
        first_finished = RequestStatus.FINISHED_STOPPED
        for request, token_id in zip(requests, sampled_token_ids, strict=True):
            if request.status >= first_finished:
                continue  # aborted while its batch was in flight (PP): no token
            request.append_token(token_id, now)
            updated.append(request)
            checker = request.stop_checker
            if checker is None:
                continue  # a request that stops only by abort or length (tests)
            result = checker.append(token_id)
            if result.text_delta:
                request.output_text += result.text_delta
            if result.finish_reason is not None:
                request.stop_reason = result.stop_reason
                self.finish_request(request, RequestStatus.finished(result.finish_reason), now)
                finished.append(request)
        if logprobs is not None:
            got = {id(r) for r in updated}
            for request, row in zip(requests, logprobs, strict=True):
                if request.logprobs is not None and id(request) in got:
                    request.logprobs.append(row)  # type: ignore[arg-type]
        return update

    def finish_request(self, request: Request, status: RequestStatus, now: float) -> None:
        if self._live.pop(request.request_id, None) is None:
            raise ValueError(f"request {request.request_id!r} is not live")
        if request.status is RequestStatus.RUNNING:
            self._drop_running(request)
            self.block_manager.free(request.seq_id)
        else:
            self.waiting.remove(request)
        request.finish(status, now)
        self._finish_forks(request, status, now)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        request = self._live.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED, now)
        self._finished.append(request)
        return request

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) - self._num_stale_running + len(self.prefilling)

    def has_unfinished_requests(self) -> bool:
        return bool(self._live) or bool(self._finished)

    def kv_stats(self) -> BlockManagerStats:
        return self.block_manager.stats()

    # ---- helpers for policies -----------------------------------------------------------

    def _begin_step(self) -> list[Request]:
        """Drops stale finished requests from `running`; returns (and clears) the requests
        finished inside the scheduler since the last step."""
        if self._num_stale_running:
            self._filter_running()
        finished, self._finished = self._finished, []
        return finished

    def _try_admit(self, request: Request, now: float) -> AllocStatus:
        """Allocates blocks for all of the request's tokens (prompt, plus generated ones
        when it is recomputed); on NEVER the request is rejected. The caller pops it from
        `waiting` when OK or NEVER.

        With prefix caching, the leading blocks already cached are shared and count as
        computed (``num_computed_tokens``), so the request's first chunk starts after them
        (a recomputed request may hit its own blocks from before its preemption)."""
        bm = self.block_manager
        token_ids = None
        if bm.enable_prefix_caching:  # one list -> array conversion for both calls
            token_ids = np.array(request.token_ids, dtype=np.int64)
        status = bm.can_allocate(request.num_tokens, token_ids)
        if status is AllocStatus.OK:
            request.num_computed_tokens = bm.allocate(request.seq_id, request.num_tokens, token_ids)
            request.status = RequestStatus.RUNNING
            request.mark_scheduled(now)
        elif status is AllocStatus.NEVER:
            self._live.pop(request.request_id)
            self._reject(
                request,
                f"needs {request.num_tokens} tokens of KV cache, more than the pool can ever "
                f"grant one request ({bm.num_blocks} blocks of {bm.block_size} tokens, "
                f"{bm.watermark_blocks} kept as watermark)",
                now,
            )
        return status

    def _cache_written_blocks(self, output: SchedulerOutput) -> None:
        """Registers the full blocks the step wrote in the prefix cache: each prefill chunk
        up to its end, each decode up to its new token. The counts come from the output,
        not from ``num_computed_tokens``, which a later schedule may already have moved."""
        # Only the blocks the step touched are passed (earlier ones were registered by
        # earlier steps or found at admission): converting a whole long context per
        # request and step would cost more than the lookup itself.
        bm = self.block_manager
        block_size = bm.block_size
        running = RequestStatus.RUNNING
        for chunk in output.prefills:
            request = chunk.request
            if request.status is running:  # not finished or preempted while in flight
                start = chunk.prefix_len - chunk.prefix_len % block_size
                end = chunk.prefix_len + chunk.num_new_tokens
                bm.cache_blocks(request.seq_id, request.token_ids[start:end], end, start)
        # Only a decode that filled its block completes one: found in numpy, so a step
        # visits the few requests that did (about 1 in block_size), not the whole batch.
        seq_lens = output.decode_seq_lens
        decodes = output.decodes
        for i in np.flatnonzero(seq_lens % block_size == 0).tolist():
            request, seq_len = decodes[i], int(seq_lens[i])
            if request.status is running:
                start = seq_len - block_size
                bm.cache_blocks(request.seq_id, request.token_ids[start:seq_len], seq_len, start)

    def _reserve_decodes(
        self, now: float, preempted: list[Request]
    ) -> tuple[list[Request], np.ndarray]:
        """One slot for every running request, preempting the most recently arrived
        request holding blocks (running or prefilling) until the rest fit. Returns the
        decodes and their slot_mapping (int64 [num_decodes]); the copy-on-write pairs of
        forked sequences appending into a shared block go to `_build_output` through
        ``_block_copies`` (the step's one source of copies)."""
        decodes = self.running
        while decodes:
            result = self.block_manager.append_slots_batch([r.seq_id for r in decodes])
            if result is not None:
                self._block_copies = result.block_copies
                for request in decodes:
                    request.num_computed_tokens += 1
                # A copy: policies append requests that finish their prefill to `running`.
                return list(decodes), result.slot_mapping
            victim = self._preempt_latest(now)
            preempted.append(victim)
            decodes = self.running
        return [], np.zeros(0, dtype=np.int64)

    def _preempt_latest(self, now: float) -> Request:
        """Preemption by recompute of the most recently arrived request holding blocks:
        its blocks are freed and it goes to the front of the waiting queue."""
        victim = max(self.running + self.prefilling, key=lambda r: (r.arrival_time, r.seq_id))
        self._drop_running(victim)
        self.block_manager.free(victim.seq_id)
        victim.mark_preempted(now)
        self._filter_running()
        self.waiting.appendleft(victim)
        return victim

    def _schedule_chunk(self, request: Request, num_new_tokens: int) -> ScheduledPrefill:
        """Commits a prefill chunk of an admitted request; the chunk that completes the
        prompt forks the request's pending sequences (they join `running`)."""
        prefix_len = request.num_computed_tokens
        request.num_computed_tokens = prefix_len + num_new_tokens
        produces_token = request.num_computed_tokens == request.num_tokens
        chunk = ScheduledPrefill(request, num_new_tokens, prefix_len, produces_token)
        if produces_token and request.forks:
            chunk.forks, request.forks = request.forks, []
            for child in chunk.forks:
                self._fork(request, child)
        return chunk

    def _fork(self, parent: Request, child: Request) -> None:
        """`child` shares all of `parent`'s blocks (scheduled KV included: this step's
        forward writes it before the child's first decode reads it)."""
        if child.request_id in self._live:
            raise ValueError(f"request_id {child.request_id!r} is already live")
        self.block_manager.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        child.first_scheduled_time = parent.first_scheduled_time
        self._live[child.request_id] = child
        self.running.append(child)

    def _finish_forks(self, request: Request, status: RequestStatus, now: float) -> None:
        """Sequences never forked (their request finished before its prefill did: abort,
        rejection, error) finish with it."""
        for child in request.forks:
            child.finish(status, now, error=request.error)
        request.forks = []

    def _num_seqs(self) -> int:
        """Sequences holding blocks now or once their prefill forks (max_num_seqs)."""
        return len(self.running) + sum(r.num_seqs for r in self.prefilling)

    def _build_output(
        self,
        prefills: list[ScheduledPrefill],
        decodes: list[Request],
        decode_slots: np.ndarray,
        preempted: list[Request],
        finished: list[Request],
    ) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput(prefills=prefills, decodes=decodes, preempted=preempted)
        out.finished = finished
        if decodes and len(self._block_copies):
            out.block_copies = self._block_copies
        self._block_copies = _NO_COPIES
        if prefills:
            chunks = [
                bm.slot_mapping(p.request.seq_id, p.prefix_len, p.prefix_len + p.num_new_tokens)
                for p in prefills
            ]
            out.slot_mapping = np.concatenate([*chunks, decode_slots])
            out.num_prefill_tokens = sum(p.num_new_tokens for p in prefills)
            if any(p.prefix_len for p in prefills):
                out.prefill_block_tables = bm.block_tables([p.request.seq_id for p in prefills])
        else:
            out.slot_mapping = decode_slots
        if decodes:
            ids = [r.seq_id for r in decodes]
            out.decode_block_tables = bm.block_tables(ids)
            out.decode_seq_lens = bm.seq_lens(ids)
        return out

    def _drop_running(self, request: Request) -> None:
        """Takes a RUNNING request out of its queue; the caller then changes its status
        (which is what `_filter_running` goes by) and frees its blocks."""
        if request in self.prefilling:
            self.prefilling.remove(request)
        else:
            self._num_stale_running += 1  # dropped from `running` by _filter_running

    def _filter_running(self) -> None:
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        self._num_stale_running = 0

    def _reject(self, request: Request, message: str, now: float) -> None:
        request.finish(RequestStatus.FINISHED_ERROR, now, error=message)
        self._finish_forks(request, RequestStatus.FINISHED_ERROR, now)
        self._finished.append(request)


_NO_COPIES = np.zeros((0, 2), dtype=np.int64)

"""Failure isolation for one step: a batch that raises fails only the request(s) causing it.

Admission (`engine.request_checks`) refuses what is known to break a step; this is the
net under it. When executing a scheduled batch raises, `isolate_failure` re-runs the
batch's requests in halves (bisecting) until every failing group is one request: those
fail, with a one-line error, and every other request gets the token it would have got
alone. Re-running is safe because the scheduler committed the batch before it ran (KV
slots reserved, ``num_computed_tokens`` advanced), and each request's rows read only its
own KV and write only its own slots, so running a request again recomputes exactly the
same KV and logits. What is not idempotent is a seeded request's generator (one draw per
sampled step): `GeneratorSnapshot`, taken before the batch first ran, puts each back
before the request is run again.

One implementation for the colocated engine and both disaggregated instances. An
executor whose workers died (`WorkerFailedError`) is not a request's fault: it is re-raised
at once, for the caller to fail everything.

`check_sampled` applies the same rule to a step that ran: a row that sampled an id outside
the vocabulary (NaN probabilities) fails alone, instead of failing the next step's
embedding lookup for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from distserve_rt.core.request import Request
from distserve_rt.core.scheduler import SchedulerOutput
from distserve_rt.distributed.launch import WorkerFailedError
from distserve_rt.logger import init_logger
from distserve_rt.worker.executor import Executor
from distserve_rt.worker.model_runner import ModelRunnerOutput

logger = init_logger(__name__)

RunFn = Callable[[SchedulerOutput], ModelRunnerOutput]
"""Runs one (sub-)batch to completion: the executor's ``execute``, or submit + wait."""


@dataclass(slots=True)
class IsolatedStep:
    """A step after isolation: the batch without its failed requests, and their tokens."""

    scheduler_output: SchedulerOutput
    """The surviving part of the batch; ``finished`` and ``preempted`` of the original."""
    runner_output: ModelRunnerOutput
    """One row per ``scheduler_output.sampling_requests()``, as a normal step."""
    failed: list[tuple[Request, str]] = field(default_factory=list)
    """(request, one-line error) of each request that failed alone, batch order."""


class GeneratorSnapshot:
    """The random streams of a batch's in-process requests before it ran (a request's
    `generator`, or the migrated `generator_state` it will be restored from)."""

    __slots__ = ("_saved",)

    def __init__(self, requests: Collection[Request]) -> None:
        # Only seeded requests have streams; unseeded rows draw from the engine-wide one.
        self._saved = {
            r.seq_id: (
                r.generator,
                None if r.generator is None else r.generator.get_state(),
                r.generator_state,
            )
            for r in requests
            if r.generator is not None or r.generator_state is not None
        }

    def restore(self, requests: Collection[Request]) -> None:
        """Puts these requests' streams back where they were before the batch ran."""
        for r in requests:
            saved = self._saved.get(r.seq_id)
            if saved is None:
                # Unseeded, or seeded and first sampled in this batch: the sampler seeds
                # a new generator from the request's seed on its next draw.
                if r.sampling_params.seed is not None:
                    r.generator = None
                continue
            generator, state, migrated = saved
            if generator is not None:
                generator.set_state(state)
            r.generator, r.generator_state = generator, migrated


def batch_requests(batch: SchedulerOutput) -> list[Request]:
    """Every request the batch computes rows for (prefill chunks, then decodes)."""
    return [p.request for p in batch.prefills] + list(batch.decodes)


def execute_isolated(executor: Executor, batch: SchedulerOutput, vocab_size: int) -> IsolatedStep:
    """Runs `batch` on `executor` now; a failure fails only the requests that fail alone
    (the disaggregated instances' step; `LLMEngine` submits and waits separately)."""
    snapshot = GeneratorSnapshot(batch.sampling_requests())
    try:
        output = executor.execute(batch)
    except Exception as exc:  # noqa: BLE001 - isolate_failure re-raises fatal ones
        return isolate_failure(executor.execute, batch, exc, snapshot, vocab_size)
    return check_sampled(batch, output, vocab_size)


def isolate_failure(
    run: RunFn,
    batch: SchedulerOutput,
    error: Exception,
    snapshot: GeneratorSnapshot,
    vocab_size: int,
) -> IsolatedStep:
    """`batch` raised `error`: finds the requests that fail alone (see the module
    docstring). Raises `error` (or a later `WorkerFailedError`) when it is engine-fatal."""
    if isinstance(error, WorkerFailedError):
        raise error
    requests = [r for r in batch_requests(batch) if not r.is_finished]
    logger.warning(
        "a step of %d requests failed (%s: %s); re-running them in smaller groups to find "
        "the cause",
        len(requests),
        type(error).__name__,
        _first_line(error),
    )
    search = _Search(run, batch, snapshot)
    if len(requests) > 1:
        search.bisect(requests)
    elif requests:
        search.fail(requests[0], error)  # it already failed alone
    survivors = [r for r in requests if r.seq_id not in search.failed]
    step = search.assemble(survivors)
    checked = check_sampled(step.scheduler_output, step.runner_output, vocab_size)
    checked.failed = search.failures(requests) + _failed_forks(batch, search) + checked.failed
    return checked


def _failed_forks(batch: SchedulerOutput, search: _Search) -> list[tuple[Request, str]]:
    """The sequences forked off a failed request's prompt (n > 1) fail with it: their KV
    is its prompt's, which the failed step did not write."""
    return [
        (child, search.failed[chunk.request.seq_id])
        for chunk in batch.prefills
        if chunk.request.seq_id in search.failed
        for child in chunk.forks
    ]


def check_sampled(
    batch: SchedulerOutput, output: ModelRunnerOutput, vocab_size: int
) -> IsolatedStep:
    """Fails the rows whose sampled id is outside ``[0, vocab_size)``; the others as is."""
    ids = output.sampled_token_ids
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return IsolatedStep(batch, output)
    rows = batch.sampling_requests()
    failed = []
    for request, token_id in zip(rows, ids, strict=True):
        if not 0 <= token_id < vocab_size:
            message = (
                f"request {request.request_id!r} sampled token id {token_id}, outside the "
                f"vocabulary [0, {vocab_size}) (its sampling parameters gave NaN probabilities)"
            )
            logger.error("%s", message)
            failed.append((request, message))
    bad = {r.seq_id for r, _ in failed}
    keep = [r for r in batch_requests(batch) if r.seq_id not in bad]
    results = {r.seq_id: _row(output, i, r.seq_id) for i, r in enumerate(rows)}
    step = _assemble(batch, keep, results)
    step.failed = failed
    return step


def sub_batch(batch: SchedulerOutput, keep: Collection[int]) -> SchedulerOutput:
    """The part of `batch` computing the requests whose seq_id is in `keep`: their chunks
    and decodes with their slots, block table rows and seq_lens, in batch order. Finished
    and preempted lists stay empty (the caller reports the original's)."""
    prefills, prefill_rows, slots = [], [], []
    start = 0
    for row, chunk in enumerate(batch.prefills):
        end = start + chunk.num_new_tokens
        if chunk.request.seq_id in keep:
            prefills.append(chunk)
            prefill_rows.append(row)
            slots.append(batch.slot_mapping[start:end])
        start = end
    decode_rows = [j for j, r in enumerate(batch.decodes) if r.seq_id in keep]
    slots.append(batch.slot_mapping[start:][decode_rows])
    out = SchedulerOutput(
        prefills=prefills,
        decodes=[batch.decodes[j] for j in decode_rows],
        slot_mapping=np.concatenate(slots),
        num_prefill_tokens=sum(p.num_new_tokens for p in prefills),
        # All of them: a re-run copies again (a copy's source is never written by the
        # step, so copying twice gives the same block).
        block_copies=batch.block_copies,
    )
    if batch.prefill_block_tables is not None and prefills:
        out.prefill_block_tables = batch.prefill_block_tables[prefill_rows]
    if decode_rows:
        out.decode_block_tables = batch.decode_block_tables[decode_rows]
        out.decode_seq_lens = batch.decode_seq_lens[decode_rows]
    return out


# (token id, logprobs row or None, generator state or None) of one sampled request
_Row = tuple[int, dict[int, float] | None, bytes | None]


class _Search:
    """Runs groups of the failed batch; records each request's row, or its failure."""

    def __init__(self, run: RunFn, batch: SchedulerOutput, snapshot: GeneratorSnapshot):
        self.run, self.batch, self.snapshot = run, batch, snapshot
        self.results: dict[int, _Row] = {}
        self.failed: dict[int, str] = {}

    def bisect(self, group: list[Request]) -> None:
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            error = self.attempt(part)
            if error is None:
                continue
            if len(part) == 1:
                self.fail(part[0], error)
            else:
                self.bisect(part)

    def attempt(self, group: list[Request]) -> Exception | None:
        """Runs `group` alone; records its rows, or returns what it raised."""
        self.snapshot.restore(group)
        sub = sub_batch(self.batch, {r.seq_id for r in group})
        try:
            output = self.run(sub)
        except WorkerFailedError:
            raise
        except Exception as exc:  # noqa: BLE001 - narrowed down by the caller
            return exc
        for i, request in enumerate(sub.sampling_requests()):
            self.results[request.seq_id] = _row(output, i, request.seq_id)
        return None

    def fail(self, request: Request, error: Exception) -> None:
        message = (
            f"request {request.request_id!r} failed the engine step on its own: "
            f"{type(error).__name__}: {_first_line(error)}"
        )
        logger.error("%s", message, exc_info=error)
        self.failed[request.seq_id] = message

    def failures(self, requests: list[Request]) -> list[tuple[Request, str]]:
        return [(r, self.failed[r.seq_id]) for r in requests if r.seq_id in self.failed]

    def assemble(self, survivors: list[Request]) -> IsolatedStep:
        return _assemble(self.batch, survivors, self.results)


def _assemble(
    batch: SchedulerOutput, keep: list[Request], results: dict[int, _Row]
) -> IsolatedStep:
    out = sub_batch(batch, {r.seq_id for r in keep})
    out.finished, out.preempted = batch.finished, batch.preempted
    rows = [results[r.seq_id] for r in out.sampling_requests()]
    logprobs = [row[1] for row in rows]
    states = {r.seq_id: row[2] for r, row in zip(out.sampling_requests(), rows, strict=True)}
    states = {k: v for k, v in states.items() if v is not None}
    runner_output = ModelRunnerOutput(
        sampled_token_ids=[row[0] for row in rows],
        logprobs=logprobs if any(lp is not None for lp in logprobs) else None,
        generator_states=states or None,
    )
    return IsolatedStep(out, runner_output)


def _row(output: ModelRunnerOutput, i: int, seq_id: int) -> _Row:
    logprobs = None if output.logprobs is None else output.logprobs[i]
    states = output.generator_states
    state = None if states is None else states.get(seq_id)
    return output.sampled_token_ids[i], logprobs, state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"

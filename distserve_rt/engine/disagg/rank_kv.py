"""KV export and pulls of an instance that spans several worker processes (TP x PP > 1).

Each rank holds its own part of the KV (its stage's layers, its TP rank's heads), so each
rank exports or pulls its own pool; the instance process drives them over the executor's
channel (`MultiprocExecutor.broadcast`, between steps):

* prefill ranks allocate their pool through the transport; ``("export_kv",)`` answers the
  pool's descriptor bytes (the instance's descriptors are these, rank order); every step
  ends with ``transport.mark_ready`` (pulls announced after it see its writes);
* decode ranks take ``("open_peers", {prefill index: [descriptor bytes per rank]},
  geometry)`` once, then per migration ``("pull", pull id, prefill index, src block ids,
  dst block ids)``: each rank submits its slices (`kv_migration.submit_pulls`,
  `plan_kv_pulls`) and answers at once (None, or the error that kept it from submitting);
  ``("poll_pulls",)`` answers the `RankPullResult`s of its pulls that became final since
  the last poll (`RankPulls` on each rank). The decode instance's `RankPuller` reports the
  migration once every rank did; it succeeded when every rank did.

Pulls do not stall the decode loop: steps run while transfers are in flight. They never
touch the same blocks: a pull's destination blocks belong to a request in the decode
scheduler's ``pulling`` set, which no batch contains until the pull is done.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np
import torch

from distserve_rt.config import EngineConfig
from distserve_rt.core.request import Request
from distserve_rt.distributed.launch import RankContext, send_ok
from distserve_rt.engine.disagg.devices import make_transport
from distserve_rt.engine.disagg.kv_migration import (
    FinishedPull,
    Pull,
    PullGeometry,
    PullOutcome,
    check_block_counts,
    pull_error,
    submit_pulls,
)
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.transfer import KVTransport, PoolDescriptor, TransferHandle
from distserve_rt.worker.multiproc_executor import MultiprocExecutor
from distserve_rt.worker.step_batch import StepBatch, StepSampling
from distserve_rt.worker.worker_process import WorkerProcess

PULL_TIMEOUT_S = 60.0
"""A rank's pull that is not final by then fails its migration (never a hang)."""


class KVWorkerProcess(WorkerProcess):
    """A TP/PP rank of a prefill (exports its pool) or decode (pulls into it) instance."""

    def __init__(
        self,
        ctx: RankContext,
        conn: Connection,
        config: EngineConfig,
        is_prefill: bool,
        transport_name: str,
        shares_gpu: bool = False,
        min_pull_s: float = 0.0,
    ) -> None:
        # This rank's device (cuda_ipc binds to it; launch._bootstrap made it current).
        self.transport = make_transport(transport_name, ctx.device)
        self.is_prefill = is_prefill
        allocate = self.transport.allocate_pool if is_prefill else None
        super().__init__(ctx, conn, config, allocate_pool=allocate, shared_gpu=shares_gpu)
        p = ctx.parallel
        self.pulls = RankPulls(self.transport, p.tp_rank, p.pp_rank, min_pull_s)

    @property
    def pool(self):
        pool = self.worker.kv_pool
        if pool is None:
            raise RuntimeError("the KV pool is not allocated yet")
        return pool

    def step(self, batch: StepBatch, sampling: StepSampling) -> None:
        super().step(batch, sampling)
        if self.is_prefill:
            self.transport.mark_ready(self.pool)

    def handle_other(self, message: tuple) -> None:
        if message[0] == "export_kv":
            send_ok(self.conn, self.transport.register_pool(self.pool).to_bytes())
        elif message[0] in RankPulls.COMMANDS:
            send_ok(self.conn, self.pulls.answer(message, self.pool))
        else:
            super().handle_other(message)

    def close(self) -> None:
        self.transport.close()


class RankPulls:
    """One decode rank's pulls: submitted on ``pull`` (answered at once), reported once
    final on ``poll_pulls``.

    Args:
        transport: the rank's transport (it opens the prefill ranks' pools).
        tp_rank, pp_rank: this rank (its pool holds those heads and layers).
        min_pull_s: `DisaggConfig.debug_min_pull_s`.
        clock: monotonic seconds (tests drive it with the fake transport's).
    """

    COMMANDS = ("open_peers", "pull", "poll_pulls")

    def __init__(
        self,
        transport: KVTransport,
        tp_rank: int,
        pp_rank: int,
        min_pull_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self.min_pull_s = min_pull_s
        self._clock = clock
        self._peers: dict[int, list[object]] = {}
        self._geometry: PullGeometry | None = None
        self._in_flight: dict[int, _RankPull] = {}  # by pull id

    def answer(self, message: tuple, pool: torch.Tensor) -> object:
        """The answer to one of `COMMANDS`; `pool` is this rank's KV pool (the destination)."""
        kind = message[0]
        if kind == "open_peers":
            return self.open_peers(message[1], message[2])
        if kind == "pull":
            return self.submit(pool, *message[1:])
        if kind == "poll_pulls":
            return self.poll()
        raise ValueError(f"not a pull command: {kind!r}")

    def open_peers(self, descriptors: dict[int, list[bytes]], geometry: PullGeometry) -> None:
        self._geometry = dataclasses.replace(
            geometry, dst_tp_rank=self.tp_rank, dst_pp_rank=self.pp_rank
        )
        for index, raws in descriptors.items():
            self._peers[index] = [
                self.transport.open_peer(PoolDescriptor.from_bytes(raw)) for raw in raws
            ]

    def submit(
        self,
        pool: torch.Tensor,
        pull_id: int,
        prefill_index: int,
        src_block_ids: list[int],
        dst_block_ids: np.ndarray,
    ) -> str | None:
        """Submits this rank's slices of one migration; the error if it could not."""
        if self._geometry is None or prefill_index not in self._peers:
            return f"no pool descriptor for prefill-{prefill_index}"
        try:
            handles = submit_pulls(
                self.transport, self._peers[prefill_index], self._geometry, pool,
                src_block_ids, dst_block_ids,
            )  # fmt: skip
        except Exception as exc:  # fails this migration only, not the rank or the instance
            return f"rank (tp {self.tp_rank}, pp {self.pp_rank}) could not submit: {exc}"
        self._in_flight[pull_id] = _RankPull(handles, self._clock())
        return None

    def poll(self) -> list[RankPullResult]:
        """This rank's pulls that became final (or timed out) since the last poll."""
        now = self._clock()
        results = []
        for pull_id, pull in list(self._in_flight.items()):
            final = all(h.poll().is_final for h in pull.handles)
            if not final and now - pull.start_time > PULL_TIMEOUT_S:
                # No backend can cancel a started copy; one still running after a minute
                # means the machine is stuck, and the migration must fail, not hang.
                error = f"KV pull not done after {PULL_TIMEOUT_S} s"
                results.append(RankPullResult(pull_id, error))
            elif not final:
                continue
            elif now - pull.start_time < self.min_pull_s:
                continue  # debug_min_pull_s: a slow transfer, for tests
            else:
                num_bytes = sum(h.num_bytes for h in pull.handles)
                seconds = max(h.seconds for h in pull.handles)
                results.append(
                    RankPullResult(pull_id, pull_error(pull.handles), num_bytes, seconds)
                )
            del self._in_flight[pull_id]
        return results


def run_kv_worker(
    ctx: RankContext,
    conn: Connection,
    config: EngineConfig,
    is_prefill: bool,
    transport: str,
    shares_gpu: bool = False,
    min_pull_s: float = 0.0,
) -> None:
    """`distributed.launch.WorkerTarget` of a disaggregated instance's ranks."""
    process = KVWorkerProcess(ctx, conn, config, is_prefill, transport, shares_gpu, min_pull_s)
    try:
        process.run()
    finally:
        process.close()


class RankPuller:
    """`kv_migration.KVPuller`'s interface for a decode instance whose pools live in its
    worker processes: `start` has every rank submit its slices and returns at once; `poll`
    collects the ranks' finished parts and reports each migration once all ranks did."""

    POLL_INTERVAL_S = 0.001
    """Loop wait while pulls are in flight: each poll is a round trip to every rank."""

    def __init__(self, executor: MultiprocExecutor, geometry: PullGeometry) -> None:
        # Only `executor.broadcast` is used (tests pass ranks in this process).
        self.executor = executor
        self.geometry = geometry
        self.num_verified = 0  # debug_verify_kv is refused for TP x PP instances
        self.pulls: dict[str, Pull] = {}
        """In flight, by request id."""
        self._gathers: dict[int, _Gather] = {}  # by pull id
        self._pull_ids = itertools.count()
        self._num_succeeded = self._num_failed = self._bytes = 0
        self._seconds = 0.0

    def open_peers(self, descriptors: dict[int, list[bytes]]) -> None:
        self.executor.broadcast(("open_peers", descriptors, self.geometry))

    def start(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> None:
        """Has every rank submit its part of `migration`'s pull (does not wait for it)."""
        check_block_counts(request, migration, dst_block_ids)
        pull_id = next(self._pull_ids)
        errors = self.executor.broadcast(
            ("pull", pull_id, migration.prefill_index, migration.block_ids, dst_block_ids)
        )
        pull = Pull(request, migration, [], dst_block_ids, now)
        gather = _Gather(pull, num_ranks=len(errors))
        for rank, error in enumerate(errors):
            if error is not None:  # nothing submitted on that rank: its part is final
                gather.results[rank] = RankPullResult(pull_id, error)
        self.pulls[request.request_id] = pull
        self._gathers[pull_id] = gather

    def poll(self, now: float) -> list[FinishedPull]:
        """The migrations every rank finished since the last call (one round trip to the
        ranks while pulls are in flight; none otherwise)."""
        if not self._gathers:
            return []
        for rank, results in enumerate(self.executor.broadcast(("poll_pulls",))):
            for result in results:
                self._gathers[result.pull_id].results[rank] = result
        done = []
        for pull_id, gather in list(self._gathers.items()):
            if len(gather.results) == gather.num_ranks:
                del self._gathers[pull_id]
                del self.pulls[gather.pull.request.request_id]
                done.append(self._finish(gather, now))
        return done

    def totals(self) -> tuple[int, int, int, float]:
        return self._num_succeeded, self._num_failed, self._bytes, self._seconds

    def _finish(self, gather: _Gather, now: float) -> FinishedPull:
        results = [gather.results[rank] for rank in sorted(gather.results)]
        errors = [r.error for r in results if r.error is not None]
        if errors:
            self._num_failed += 1
            return FinishedPull(gather.pull, PullOutcome.FAILED, now, errors[0])
        num_bytes = sum(r.num_bytes for r in results)
        self._num_succeeded += 1
        self._bytes += num_bytes
        self._seconds += max(r.seconds for r in results)
        return FinishedPull(gather.pull, PullOutcome.SUCCESS, now, num_bytes=num_bytes)


@dataclass(frozen=True, slots=True)
class RankPullResult:
    """One rank's part of a migration, final: an answer of ``("poll_pulls",)``."""

    pull_id: int
    error: str | None
    """None: every slice of this rank arrived."""
    num_bytes: int = 0
    seconds: float = 0.0
    """Submit -> final, the slowest of the rank's transfers."""


@dataclass(slots=True)
class _RankPull:
    handles: list[TransferHandle]
    start_time: float


@dataclass(slots=True)
class _Gather:
    """A migration in flight on the ranks: their final parts so far, by rank."""

    pull: Pull
    num_ranks: int
    results: dict[int, RankPullResult] = field(default_factory=dict)

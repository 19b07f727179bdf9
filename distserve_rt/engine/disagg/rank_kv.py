"""KV export and pulls of an instance that spans several worker processes (TP x PP > 1).

Each rank holds its own part of the KV (its stage's layers, its TP rank's heads), so each
rank exports or pulls its own pool; the instance process drives them over the executor's
channel (`MultiprocExecutor.broadcast`, between steps) with the commands below, which
`KVWorkerProcess` adds to the worker's (`worker.commands`):

* prefill ranks allocate their pool through the transport; `ExportKVCommand` answers the
  pool's descriptor bytes (the instance's descriptors are these, rank order); every step
  ends with ``transport.mark_ready`` (pulls announced after it see its writes);
* decode ranks take `OpenPeersCommand` once, then per migration a `PullCommand`: each rank
  submits its slices (`kv_migration.submit_pulls`, `plan_kv_pulls`) and answers at once
  (None, or the error that kept it from submitting); `PollPullsCommand` answers the
  `RankPullResult`s of its pulls that became final since the last poll (`RankPulls` on
  each rank). The decode instance's `RankPuller` reports the migration once every rank
  did; it succeeded when every rank did, and fails when not every rank did within its
  `timeout_s` (the `puller.Puller` rule, on the decode instance's clock).

Pulls do not stall the decode loop: steps run while transfers are in flight. They never
touch the same blocks: a pull's destination blocks belong to a request in the decode
scheduler's ``pulling`` set, which no batch contains until the pull is done.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from distserve_rt.config import EngineConfig
from distserve_rt.core.request import Request
from distserve_rt.distributed.launch import RankContext, send_ok
from distserve_rt.engine.disagg.devices import make_transport
from distserve_rt.engine.disagg.kv_migration import (
    PullGeometry,
    open_peer_list,
    pull_error,
    submit_pulls,
)
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import (
    PULL_TIMEOUT_S,
    FinishedPull,
    Pull,
    Puller,
    PullOutcome,
)
from distserve_rt.transfer import KVTransport, TransferHandle
from distserve_rt.transfer.per_pair import RankDescriptors, descriptors_for_rank
from distserve_rt.worker.multiproc_executor import MultiprocExecutor
from distserve_rt.worker.step_batch import StepBatch, StepSampling
from distserve_rt.worker.worker_process import WorkerProcess

# ---- commands (driver -> ranks) and the ranks' settings -------------------------------------


@dataclass(frozen=True, slots=True)
class KVRankConfig:
    """What a rank of a disaggregated instance needs beyond the `EngineConfig`
    (`MultiprocExecutor(target_config=...)`)."""

    is_prefill: bool
    """Prefill ranks export their pool; decode ranks pull into theirs."""
    transport: str
    """The `transfer` backend name (`devices.make_transport`)."""
    shares_gpu: bool = False
    """`DisaggConfig.share_gpus`: KV sizing counts only this rank's own memory."""


@dataclass(frozen=True, slots=True)
class ExportKVCommand:
    """-> this prefill rank's pool descriptor bytes."""


@dataclass(frozen=True, slots=True)
class OpenPeersCommand:
    """-> None, once this decode rank mapped every prefill rank's pool."""

    descriptors: dict[int, list[bytes] | RankDescriptors]
    """Prefill index -> descriptor bytes of each of its ranks, rank order (the same for
    every rank), or chosen per rank pair (`per_pair.RankDescriptors`: each rank its row)."""
    geometry: PullGeometry
    """The instance's (each rank puts in its own TP and PP rank)."""


@dataclass(frozen=True, slots=True)
class PullCommand:
    """-> None once this rank submitted its slices of one migration, else why it could not
    (answered at once: the copies run on)."""

    pull_id: int
    prefill_index: int
    src_block_ids: list[int]
    dst_block_ids: np.ndarray
    """int32 [num_blocks], same count as `src_block_ids`."""


@dataclass(frozen=True, slots=True)
class PollPullsCommand:
    """-> the `RankPullResult`s of this rank's pulls that became final since the last poll."""


# ---- the ranks' side ------------------------------------------------------------------------


class KVWorkerProcess(WorkerProcess):
    """A TP/PP rank of a prefill (exports its pool) or decode (pulls into it) instance."""

    def __init__(
        self, ctx: RankContext, conn: Connection, config: EngineConfig, rank_config: KVRankConfig
    ) -> None:
        # This rank's device (cuda_ipc binds to it; launch._bootstrap made it current).
        self.transport = make_transport(rank_config.transport, ctx.device)
        self.is_prefill = rank_config.is_prefill
        allocate = self.transport.allocate_pool if self.is_prefill else None
        super().__init__(
            ctx, conn, config, allocate_pool=allocate, shared_gpu=rank_config.shares_gpu
        )
        p = ctx.parallel
        self.pulls = RankPulls(self.transport, p.tp_rank, p.pp_rank)

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

    def command_handlers(self) -> dict[type, Callable[[Any], None]]:
        handlers = super().command_handlers()
        handlers[ExportKVCommand] = lambda _: send_ok(
            self.conn, self.transport.register_pool(self.pool).to_bytes()
        )
        for kind in RankPulls.COMMANDS:
            handlers[kind] = lambda c: send_ok(self.conn, self.pulls.answer(c, self.pool))
        return handlers

    def close(self) -> None:
        self.transport.close()


class RankPulls:
    """One decode rank's pulls: submitted on `PullCommand` (answered at once), reported
    once final on `PollPullsCommand`. Never times out by itself: the driver's `RankPuller`
    does, and keeps polling a timed-out pull until its copies end.

    Args:
        transport: the rank's transport (it opens the prefill ranks' pools).
        tp_rank, pp_rank: this rank (its pool holds those heads and layers).
    """

    COMMANDS = (OpenPeersCommand, PullCommand, PollPullsCommand)

    def __init__(
        self,
        transport: KVTransport,
        tp_rank: int,
        pp_rank: int,
    ) -> None:
        self.transport = transport
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self._peers: dict[int, list[object]] = {}
        self._geometry: PullGeometry | None = None
        self._in_flight: dict[int, list[TransferHandle]] = {}  # by pull id

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def answer(self, command: object, pool: torch.Tensor) -> object:
        """The answer to one of `COMMANDS`; `pool` is this rank's KV pool (the destination)."""
        if isinstance(command, OpenPeersCommand):
            return self.open_peers(command.descriptors, command.geometry)
        if isinstance(command, PullCommand):
            return self.submit(
                pool, command.pull_id, command.prefill_index, command.src_block_ids,
                command.dst_block_ids,
            )  # fmt: skip
        if isinstance(command, PollPullsCommand):
            return self.poll()
        raise ValueError(
            f"not a pull command: {type(command).__name__}; expected one of "
            f"{', '.join(t.__name__ for t in self.COMMANDS)}"
        )

    def open_peers(
        self, descriptors: dict[int, list[bytes] | RankDescriptors], geometry: PullGeometry
    ) -> None:
        self._geometry = dataclasses.replace(
            geometry, dst_tp_rank=self.tp_rank, dst_pp_rank=self.pp_rank
        )
        rank = self.pp_rank * geometry.dst.tp_size + self.tp_rank
        for index, raws in descriptors.items():
            self._peers[index] = open_peer_list(self.transport, descriptors_for_rank(raws, rank))

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
        self._in_flight[pull_id] = handles
        return None

    def poll(self) -> list[RankPullResult]:
        """This rank's pulls that became final since the last poll."""
        results = []
        for pull_id, handles in list(self._in_flight.items()):
            if not all(h.poll().is_final for h in handles):
                continue
            num_bytes = sum(h.num_bytes for h in handles)
            seconds = max(h.seconds for h in handles)
            results.append(RankPullResult(pull_id, pull_error(handles), num_bytes, seconds))
            del self._in_flight[pull_id]
        return results


def run_kv_worker(
    ctx: RankContext, conn: Connection, config: EngineConfig, rank_config: KVRankConfig
) -> None:
    """`distributed.launch.WorkerTarget` of a disaggregated instance's ranks."""
    process = KVWorkerProcess(ctx, conn, config, rank_config)
    try:
        process.run()
    finally:
        process.close()


# ---- the decode instance's side -------------------------------------------------------------


class RankPuller(Puller):
    """The pulls of a decode instance whose pools live in its worker processes: `start` has
    every rank submit its slices and returns at once; `poll` collects the ranks' finished
    parts and reports each migration once all ranks did.

    Args:
        executor: the instance's executor (only `broadcast` is used: tests pass ranks in
            this process).
        geometry: both instances' parallelism.
        transport_name: the ranks' transport (named in `totals`).
        timeout_s: see `Puller`.
    """

    POLL_INTERVAL_S = 0.001
    """Each poll is a round trip to every rank."""

    def __init__(
        self,
        executor: MultiprocExecutor,
        geometry: PullGeometry,
        transport_name: str,
        timeout_s: float = PULL_TIMEOUT_S,
    ) -> None:
        super().__init__(transport_name, timeout_s)
        self.executor = executor
        self.geometry = geometry
        self._gathers: dict[int, _Gather] = {}  # by pull id
        self._pull_ids = itertools.count()

    def open_peers(self, descriptors: dict[int, list[bytes] | RankDescriptors]) -> None:
        self.executor.broadcast(OpenPeersCommand(descriptors, self.geometry))

    def _submit(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> Pull:
        pull_id = next(self._pull_ids)
        errors = self.executor.broadcast(
            PullCommand(pull_id, migration.prefill_index, migration.block_ids, dst_block_ids)
        )
        pull = Pull(request, migration, [], dst_block_ids, now)
        gather = _Gather(pull, num_ranks=len(errors))
        for rank, error in enumerate(errors):
            if error is not None:  # nothing submitted on that rank: its part is final
                gather.results[rank] = RankPullResult(pull_id, error)
        self._gathers[pull_id] = gather
        return pull

    def _collect_final(self, now: float) -> list[FinishedPull]:
        """One round trip to the ranks while pulls are in flight; none otherwise."""
        if not self._gathers:
            return []
        for rank, results in enumerate(self.executor.broadcast(PollPullsCommand())):
            for result in results:
                self._gathers[result.pull_id].results[rank] = result
        done = []
        for pull_id, gather in list(self._gathers.items()):
            if len(gather.results) == gather.num_ranks:
                del self._gathers[pull_id]
                done.append(self._finish(gather, now))
        return done

    @staticmethod
    def _finish(gather: _Gather, now: float) -> FinishedPull:
        results = [gather.results[rank] for rank in sorted(gather.results)]
        errors = [r.error for r in results if r.error is not None]
        if errors:
            return FinishedPull(gather.pull, PullOutcome.FAILED, now, errors[0])
        num_bytes = sum(r.num_bytes for r in results)
        seconds = max(r.seconds for r in results)
        return FinishedPull(gather.pull, PullOutcome.SUCCESS, now, None, num_bytes, seconds)


@dataclass(frozen=True, slots=True)
class RankPullResult:
    """One rank's part of a migration, final: an answer of `PollPullsCommand`."""

    pull_id: int
    error: str | None
    """None: every slice of this rank arrived."""
    num_bytes: int = 0
    seconds: float = 0.0
    """Submit -> final, the slowest of the rank's transfers."""


@dataclass(slots=True)
class _Gather:
    """A migration in flight on the ranks: their final parts so far, by rank."""

    pull: Pull
    num_ranks: int
    results: dict[int, RankPullResult] = field(default_factory=dict)

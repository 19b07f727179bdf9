"""KV export and pulls of an instance that spans several worker processes (TP x PP > 1).

Each rank holds its own part of the KV (its stage's layers, its TP rank's heads), so each
rank exports or pulls its own pool; the instance process drives them over the executor's
channel (`MultiprocExecutor.broadcast`, between steps):

* prefill ranks allocate their pool through the transport; ``("export_kv",)`` answers the
  pool's descriptor bytes (the instance's descriptors are these, rank order); every step
  ends with ``transport.mark_ready`` (pulls announced after it see its writes);
* decode ranks take ``("open_peers", {prefill index: [descriptor bytes per rank]},
  geometry)`` once, then ``("pull", prefill index, src block ids, dst block ids)`` per
  migration: each rank submits its slices (`kv_migration.submit_pulls`, `plan_kv_pulls`)
  and answers ``(error or None, num_bytes, seconds)`` when they are final. The migration is
  done when every rank reported success.

Pulls are synchronous here (the decode instance waits for its ranks, bounded by
`PULL_TIMEOUT_S`); a CPU pull of a request's blocks takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import time
from multiprocessing.connection import Connection

import numpy as np

from distserve_rt.core.request import Request
from distserve_rt.distributed.launch import RankContext, send_ok
from distserve_rt.engine.config import EngineConfig
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
from distserve_rt.transfer import PoolDescriptor
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
    ) -> None:
        # This rank's device (cuda_ipc binds to it; launch._bootstrap made it current).
        self.transport = make_transport(transport_name, ctx.device)
        self.is_prefill = is_prefill
        allocate = self.transport.allocate_pool if is_prefill else None
        super().__init__(ctx, conn, config, allocate_pool=allocate, shared_gpu=shares_gpu)
        self._peers: dict[int, list[object]] = {}
        self._geometry: PullGeometry | None = None

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
        kind = message[0]
        if kind == "export_kv":
            send_ok(self.conn, self.transport.register_pool(self.pool).to_bytes())
        elif kind == "open_peers":
            self._open_peers(message[1], message[2])
            send_ok(self.conn)
        elif kind == "pull":
            send_ok(self.conn, self._pull(message[1], message[2], message[3]))
        else:
            super().handle_other(message)

    def _open_peers(self, descriptors: dict[int, list[bytes]], geometry: PullGeometry) -> None:
        p = self.ctx.parallel
        self._geometry = dataclasses.replace(geometry, dst_tp_rank=p.tp_rank, dst_pp_rank=p.pp_rank)
        for index, raws in descriptors.items():
            self._peers[index] = [
                self.transport.open_peer(PoolDescriptor.from_bytes(raw)) for raw in raws
            ]

    def _pull(
        self, prefill_index: int, src_block_ids: list[int], dst_block_ids: np.ndarray
    ) -> tuple[str | None, int, float]:
        start = time.monotonic()
        if self._geometry is None or prefill_index not in self._peers:
            return f"no pool descriptor for prefill-{prefill_index}", 0, 0.0
        handles = submit_pulls(
            self.transport, self._peers[prefill_index], self._geometry, self.pool,
            src_block_ids, dst_block_ids,
        )  # fmt: skip
        deadline = start + PULL_TIMEOUT_S
        for handle in handles:
            if not handle.wait(max(0.0, deadline - time.monotonic())).is_final:
                return f"KV pull not done after {PULL_TIMEOUT_S} s", 0, 0.0
        error = pull_error(handles)
        return error, sum(h.num_bytes for h in handles), time.monotonic() - start

    def close(self) -> None:
        self.transport.close()


def run_kv_worker(
    ctx: RankContext,
    conn: Connection,
    config: EngineConfig,
    is_prefill: bool,
    transport: str,
    shares_gpu: bool = False,
) -> None:
    """`distributed.launch.WorkerTarget` of a disaggregated instance's ranks."""
    process = KVWorkerProcess(ctx, conn, config, is_prefill, transport, shares_gpu)
    try:
        process.run()
    finally:
        process.close()


class RankPuller:
    """`kv_migration.KVPuller`'s interface for a decode instance whose pools live in its
    worker processes: `start` has every rank pull its slice and returns when all are done;
    `poll` then reports the migration."""

    def __init__(self, executor: MultiprocExecutor, geometry: PullGeometry) -> None:
        self.executor = executor
        self.geometry = geometry
        self.num_verified = 0  # debug_verify_kv is refused for TP x PP instances
        self.pulls: dict[str, Pull] = {}
        self._done: list[FinishedPull] = []
        self._num_succeeded = self._num_failed = self._bytes = 0
        self._seconds = 0.0

    def open_peers(self, descriptors: dict[int, list[bytes]]) -> None:
        self.executor.broadcast(("open_peers", descriptors, self.geometry))

    def start(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> None:
        check_block_counts(request, migration, dst_block_ids)
        answers = self.executor.broadcast(
            ("pull", migration.prefill_index, migration.block_ids, dst_block_ids)
        )
        pull = Pull(request, migration, [], dst_block_ids, now)
        errors = [error for error, _, _ in answers if error is not None]
        num_bytes = sum(n for _, n, _ in answers)
        end = time.monotonic()
        if errors:
            self._num_failed += 1
            self._done.append(FinishedPull(pull, PullOutcome.FAILED, end, errors[0]))
            return
        self._num_succeeded += 1
        self._bytes += num_bytes
        self._seconds += max(s for _, _, s in answers)
        self._done.append(FinishedPull(pull, PullOutcome.SUCCESS, end, num_bytes=num_bytes))

    def poll(self, now: float) -> list[FinishedPull]:
        done, self._done = self._done, []
        return done

    def totals(self) -> tuple[int, int, int, float]:
        return self._num_succeeded, self._num_failed, self._bytes, self._seconds

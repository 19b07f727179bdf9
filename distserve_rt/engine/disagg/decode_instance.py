"""A decode instance: admits announced migrations when its pool has room, pulls their KV
(a `puller.Puller`), then decodes them with continuous batching.

With prefix caching on, a migration's leading blocks already cached in this pool are not
pulled (the delta pull: the source and destination block lists are cut alike, so every
transport and TP x PP re-slicing sees a shorter migration, nothing else). Requests the
controller sends as `NewRequest` are prefilled here (conditional disaggregation)."""

from __future__ import annotations

import contextlib
import dataclasses
import time

from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler.decode import DecodeScheduler
from distserve_rt.core.stop_checker import FinishReason
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.faults import FaultyPuller
from distserve_rt.engine.disagg.instance import Instance, InstanceSpec
from distserve_rt.engine.disagg.kv_migration import KVPuller, PullGeometry
from distserve_rt.engine.disagg.migration import Migration, MigrationEvent, MigrationState
from distserve_rt.engine.disagg.puller import FinishedPull, Pull, Puller, PullOutcome
from distserve_rt.engine.disagg.rank_kv import RankPuller
from distserve_rt.engine.step_isolation import execute_isolated


class DecodeInstance(Instance):
    def __init__(self, spec: InstanceSpec) -> None:
        super().__init__(spec)
        self.scheduler = DecodeScheduler(self.scheduler_config, self.block_manager)
        mc, ec = self.model_config, spec.engine_config
        geometry = PullGeometry(
            mc.num_layers, mc.num_kv_heads, spec.prefill_parallelism, ec.parallelism
        )
        self.puller: Puller
        if self.worker is not None:
            assert self.worker.kv_pool is not None  # init_kv_cache allocated it
            # A fault plan acts in self.transport (`faults.FaultyTransport`).
            self.puller = KVPuller(self.transport, self.worker.kv_pool, geometry)
        else:
            self.puller = RankPuller(self.executor, geometry, spec.transport)  # type: ignore[arg-type]
            if self.faults is not None:  # the ranks' transports are out of the plan's reach
                self.puller = FaultyPuller(self.puller, self.faults)
        self.migrations: dict[str, Migration] = {}
        """Migrations whose source KV the prefill instance holds for us (until our
        MigrationDone, or the controller's revoke), changed only by `Migration.apply`:
        ANNOUNCED while the scheduler keeps the request `pending` (no blocks), PULLING or
        ABORTING while it is in `pulling` (blocks being written)."""
        self._decoding: set[str] = set()  # requests that had their first decode step
        self._reused_blocks: dict[str, int] = {}  # pulls in flight: blocks not pulled
        self.num_blocks_pulled = 0
        self.num_blocks_reused = 0
        """Of the migrations that arrived, blocks copied and blocks found cached here."""
        self.num_local_prefills = 0
        """Requests sent here to be prefilled (`NewRequest`)."""

    def ready_message(self) -> msg.Ready:
        return msg.Ready(self.spec.name, self.model_config, self.block_manager.num_blocks)

    def handle(self, message: object, now: float) -> None:
        if isinstance(message, msg.Migrate):
            request = self.make_request(message)
            request.num_computed_tokens = request.num_tokens - 1
            request.generator_state = message.generator_state  # the sampler restores it
            self.migrations[message.request_id] = Migration(
                message.request_id, message.prefill_index, self.spec.index,
                message.block_ids, announcement=message,
            )  # fmt: skip
            self.scheduler.add_migrated(request)
        elif isinstance(message, msg.NewRequest):
            # Conditional disaggregation: prefilled here by the recompute path (prefill-first).
            self.num_local_prefills += 1
            self.scheduler.add_request(self.make_request(message))
        elif isinstance(message, msg.Revoke):
            self._revoke(message.request_id, now)
        elif isinstance(message, msg.Abort):
            self._abort(message.request_id, now)
        elif isinstance(message, msg.PeerPools):
            self.puller.open_peers(message.descriptors)
            self.outbox.append(msg.PeersOpened(self.spec.name))
        else:
            raise ValueError(f"{self.spec.name} got an unexpected message {message!r}")

    def _pending(self, request_id: str) -> Request | None:
        return next((r for r in self.scheduler.pending if r.request_id == request_id), None)

    def _revoke(self, request_id: str, now: float) -> None:
        migration = self.migrations.get(request_id)
        if migration is None or migration.state is not MigrationState.ANNOUNCED:
            # The pull started (its MigrationDone follows or went out), or it is over.
            self.outbox.append(msg.RevokeResult(request_id, -1, revoked=False))
            return
        migration.apply(MigrationEvent.REVOKE_CONFIRMED, now)
        del self.migrations[request_id]  # the controller releases the source KV
        request = self._pending(request_id)
        assert request is not None, request_id  # ANNOUNCED: pending in the scheduler
        self.scheduler.drop_migration(request, RequestStatus.FINISHED_ERROR, now)
        self.outbox.append(msg.RevokeResult(request_id, migration.prefill_index, revoked=True))

    def _abort(self, request_id: str, now: float) -> None:
        migration = self.migrations.get(request_id)
        if migration is None:
            self.scheduler.abort_request(request_id, now)  # reported by the next schedule
            return
        if migration.state is MigrationState.ABORTING:
            return
        migration.apply(MigrationEvent.ABORTED, now)
        if migration.state is MigrationState.ABORTING and request_id in self.scheduler.pulling:
            return  # the transfer still writes its blocks: dropped when it ends
        # Not pulling: nothing reads the source any more.
        migration.apply(MigrationEvent.DROPPED, now)
        request = self._pending(request_id)
        assert request is not None, request_id
        self.scheduler.drop_migration(request, RequestStatus.FINISHED_ABORTED, now)
        self._end_migration(migration, False, now, now, error="aborted")
        self.outbox.append(self.finished_tokens(request, now))

    def _end_migration(
        self, migration: Migration, ok: bool, start: float, end: float, num_bytes: int = 0,
        error: str | None = None,
    ) -> None:  # fmt: skip
        """A final migration: tells the controller (which releases the source KV)."""
        assert migration.state.is_final, migration.state
        del self.migrations[migration.request_id]
        done = msg.MigrationDone(
            migration.request_id, migration.prefill_index, ok, start, end, num_bytes, error
        )
        reused = self._reused_blocks.pop(migration.request_id, 0)
        if ok:
            done.num_blocks_reused = reused
            done.num_blocks_pulled = len(migration.block_ids) - reused
            self.num_blocks_reused += reused
            self.num_blocks_pulled += done.num_blocks_pulled
        self.outbox.append(done)

    # ---- the step ---------------------------------------------------------------------------

    def step(self, now: float) -> None:
        step_start = time.perf_counter()
        if self.faults is None or not self.faults.hold_pulls:
            for request in self.scheduler.admit_migrations(now):
                self._start_pull(request, now)
        for finished in self.puller.poll(self.clock()):
            self._finish_pull(finished)
        out = self.scheduler.schedule(now)
        for request in out.finished:  # aborted, or rejected (never fits this pool)
            self.release(request)
            self._decoding.discard(request.request_id)
            migration = self.migrations.get(request.request_id)
            if migration is not None:  # rejected before its pull could start
                migration.apply(MigrationEvent.PULL_FAILED, now)
                self._end_migration(migration, False, now, now, error=request.error)
            self.outbox.append(self.finished_tokens(request, now))
        if out.is_empty:
            return
        start = time.monotonic()  # after the pulls above (the decode queue ends here)
        # A request that fails the step alone is reported failed; the rest go on.
        isolated = execute_isolated(self.executor, out, self.model_config.vocab_size)
        end = time.monotonic()
        for request, error in isolated.failed:
            self._fail_in_step(request, error, end)
        result = isolated.runner_output
        update = self.scheduler.update_from_output(
            isolated.scheduler_output, result.sampled_token_ids, result.logprobs, end
        )
        for request in update.updated:
            self._emit(request, start, end)
        self.record_step(out, step_start, end - start)

    def _start_pull(self, request: Request, now: float) -> None:
        migration = self.migrations[request.request_id]
        migration.apply(MigrationEvent.PULL_STARTED, now)
        dst = self.block_manager.block_table(request.seq_id)
        announced: msg.Migrate = migration.announcement  # type: ignore[assignment]
        # The leading blocks this pool has cached hold the same tokens' KV: pull the rest.
        reused = self.scheduler.reused_tokens[request.request_id] // self.block_manager.block_size
        self._reused_blocks[request.request_id] = reused
        if reused:
            announced = dataclasses.replace(announced, block_ids=announced.block_ids[reused:])
            dst = dst[reused:]
        # A fault plan names requests; its transport wrapper sees only blocks.
        scope = contextlib.nullcontext() if self.faults is None else self.faults.submitting(
            request.request_id
        )  # fmt: skip
        try:
            with scope:
                self.puller.start(request, announced, dst, now)
        except Exception as exc:  # bad ids, a peer gone: this migration fails, not the rest
            pull = Pull(request, announced, [], dst, now)
            error = f"KV pull could not start: {type(exc).__name__}: {exc}"
            self._finish_pull(FinishedPull(pull, PullOutcome.FAILED, self.clock(), error))

    def _finish_pull(self, finished: FinishedPull) -> None:
        pull, request = finished.pull, finished.pull.request
        migration = self.migrations[request.request_id]
        if finished.outcome is PullOutcome.TIMED_OUT:
            self._time_out(migration, request, finished)
            return
        ok = finished.outcome is PullOutcome.SUCCESS
        event = MigrationEvent.PULL_SUCCEEDED if ok else MigrationEvent.PULL_FAILED
        state = migration.apply(event, finished.end_time)
        self._end_migration(
            migration, state is MigrationState.PULLED, pull.start_time, finished.end_time,
            finished.num_bytes, finished.error,
        )  # fmt: skip
        if state is MigrationState.PULLED:
            self.scheduler.complete_migration(request)
            return
        aborted = state is MigrationState.ABORTED
        status = RequestStatus.FINISHED_ABORTED if aborted else RequestStatus.FINISHED_ERROR
        self.scheduler.drop_migration(request, status, finished.end_time)
        request.error = None if aborted else finished.error
        self.outbox.append(self.finished_tokens(request, finished.end_time))

    def _time_out(self, migration: Migration, request: Request, finished: FinishedPull) -> None:
        """The pull outlived the puller's timeout: the request fails now, but its copies may
        still read the source and write our blocks, so the migration is aborted (both sides'
        blocks stay held) and ends when the puller reports the copies final."""
        if migration.state is not MigrationState.PULLING:
            return  # aborted meanwhile: it ends with its pull already
        migration.apply(MigrationEvent.ABORTED, finished.end_time)
        self.outbox.append(
            msg.Tokens(
                request.request_id, [], finished.end_time, FinishReason.ERROR,
                error=finished.error,
            )
        )  # fmt: skip

    def _fail_in_step(self, request: Request, error: str, now: float) -> None:
        request.error = error
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR, now)
        self.release(request)
        self._decoding.discard(request.request_id)
        self.outbox.append(self.finished_tokens(request, now))

    def _emit(self, request: Request, start: float, end: float) -> None:
        """Streams the token the step appended (and the request's end, if it stopped)."""
        tokens = msg.Tokens(request.request_id, [request.token_ids[-1]], end)
        if request.logprobs is not None:
            # Streamed, not kept: the controller holds each request's logprobs.
            tokens.logprobs, request.logprobs = request.logprobs, []
        if request.request_id not in self._decoding:
            self._decoding.add(request.request_id)
            tokens.first_decode_time = start
        if request.is_finished:
            self.release(request)
            self._decoding.discard(request.request_id)
            tokens.finish_reason = request.finish_reason
            tokens.stop_reason = request.stop_reason
        self.outbox.append(tokens)

    def poll_interval_s(self) -> float:
        s = self.scheduler
        if s.running or s.waiting:
            return 0.0
        if self.puller.num_in_flight:
            return self.puller.POLL_INTERVAL_S
        return 0.0005 if s.pending else 0.02

    def status(self) -> msg.InstanceStatus:
        s, bm = self.scheduler, self.block_manager
        t, kv = self.puller.totals(), bm.stats()
        return msg.InstanceStatus(
            s.num_running, s.num_waiting, bm.num_free_blocks, bm.usage,
            num_transfers=t.num_transfers, num_transfer_failures=t.num_failures,
            transfer_bytes=t.bytes, transfer_seconds=t.seconds,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_blocks_pulled=self.num_blocks_pulled, num_blocks_reused=self.num_blocks_reused,
            num_local_prefills=self.num_local_prefills,
        )  # fmt: skip

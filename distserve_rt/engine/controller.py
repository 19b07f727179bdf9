"""The controller of a disaggregated placement: prefill and decode instances in their own
processes, requests dispatched to them, KV migrations brokered, tokens streamed back.

Lifecycle of a request (see engine/disagg/README.md for the protocol and failure rules)::

    add_request ──NewRequest──► prefill instance with the fewest queued prompt tokens
    ◄──PrefillDone (first token, streamed at once; block ids of its KV)
    ──Migrate──► least-loaded decode instance (fewest requests; ties: most free blocks)
                 it pulls the KV when it has room ──MigrationDone──► ReleaseKV to prefill
    ◄──Tokens (one per decode step) ... until finish_reason is set

With prefix caching (and ``DisaggConfig.decode_prefix_caching``) the decode instance is
the one holding the longest cached prefix of the request, within a load cap
(`disagg/routing.py`), and it pulls only the blocks it lacks. Conditional disaggregation
(``DisaggConfig.local_prefill_*``, off by default) sends a request straight to a decode
instance as NewRequest when `core.cache_routing.prefill_locally` says so.

A request with ``n > 1`` or ``best_of`` fans out into child requests, each an ordinary
n == 1 request along this path; their outputs are gathered into the parent's, as the
colocated engine presents it (`disagg/fanout.py`).

It implements `EngineCore` (engine/protocol.py), as `LLMEngine` does, so `LLM` and
`AsyncLLM` drive either one. Not thread-safe: one
thread drives it. Nothing waits without a timeout.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from multiprocessing import connection

import torch

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.core.cache_routing import prefill_locally
from distserve_rt.core.dispatch import decode_load, pick_prefill
from distserve_rt.core.stop_checker import FinishReason
from distserve_rt.engine.disagg import admission, fanout, recovery
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.child import stop_children
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.instance_step_logs import InstanceStepLogs
from distserve_rt.engine.disagg.launcher import InstanceHandle, instance_specs
from distserve_rt.engine.disagg.migration import Migration, MigrationEvent
from distserve_rt.engine.disagg.routing import DecodePrefixIndex
from distserve_rt.engine.disagg.tracking import Phase, TrackedRequest
from distserve_rt.engine.protocol import EngineDeadError, EngineStats, InstanceStats, TransferTotals
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.logger import init_logger
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.multiproc_executor import load_model_config

logger = init_logger(__name__)


class Controller:
    """Starts the instances of `placement` and drives requests through them.

    Args:
        config: the instances' engine settings (model, block size, limits; its
            max_num_batched_tokens is the prefill budget L_m).
        placement: a disaggregated `Placement` (any TP x PP per phase that fits the model:
            `Placement.check_supported`).
        disagg_config: leases, retries, transport, pinning, GPU sharing, launcher.
        tokenizer: detokenizes the streamed tokens and applies stop strings (None: token
            ids only, stop strings refused).
        fault_plan: tests: held pulls, slow or failing transfers, KV verification and the
            instances' clock (`disagg/faults.py`); needs ``launcher="thread"``.

    On ``config.device="cuda"`` each instance rank gets its own GPU, or instances share
    GPUs with ``DisaggConfig(share_gpus=True)`` (`disagg/devices.py`; ValueError at start-up
    when the GPUs are too few), and decode instances pull KV through ``cuda_ipc``.
    """

    def __init__(
        self,
        config: EngineConfig,
        placement: Placement,
        disagg_config: DisaggConfig | None = None,
        *,
        tokenizer=None,
        fault_plan: FaultPlan | None = None,
    ) -> None:
        if not placement.is_disaggregated:
            raise ValueError("Controller runs disaggregated placements; use LLMEngine otherwise")
        placement.check_supported(load_model_config(config.model))
        dc = disagg_config or DisaggConfig()
        if fault_plan is not None:
            fault_plan.check(placement, dc)
        self.config = config
        self.placement = placement
        self.disagg_config = dc
        self.fault_plan = fault_plan
        self.transport_name = dc.transport_name(config.device)
        self.tokenizer = tokenizer
        self.instances = self._launch()
        if dc.launcher == "ray":  # chosen per pair, by where the instances run
            self.transport_name = "+".join(
                t for t in ("shm", "nixl") if any(t in h.spec.transport for h in self.instances)
            )
        # Runs once: at shutdown(), garbage collection, or interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_all, list(self.instances))
        self.requests: dict[str, TrackedRequest] = {}
        """Live requests by id (the failure rules in disagg/recovery.py walk them)."""
        self._outputs: list[RequestOutput] = []
        self.fan_outs: dict[str, fanout.FanOut] = {}
        """n > 1 / best_of: every child request id -> its parent's `FanOut`, until the
        parent's final output is returned (a finished child's id stays in use till then)."""
        self._step_log_replies: dict[str, list[dict]] = {}
        """Instance name -> its step log's records (`enable_step_log`)."""
        self._changed_fan_outs: dict[str, fanout.FanOut] = {}
        """Parents with an output due at the next `step` (one per step, as colocated)."""
        self.migrations: dict[str, Migration] = {}
        """Every migration whose source KV is still held, by request id: it outlives its
        request when that was aborted mid-pull. Changed only through `Migration.apply`
        (`disagg/migration.py`); `settle_migration` releases the KV and drops the record."""
        self._closed = False
        self._peers_opened: set[str] = set()
        self._stats = StatsLogger(logger, config.log_stats_interval_s)
        """The periodic stats line: tokens counted from PrefillDone and Tokens messages."""
        try:
            self.model_config = self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.scheduler_config = config.scheduler_config(self.model_config.max_position_embeddings)
        self.decode_prefixes: DecodePrefixIndex | None = None
        """What each decode instance likely holds cached (None: decode caching off)."""
        if config.enable_prefix_caching and dc.decode_prefix_caching:
            self.decode_prefixes = DecodePrefixIndex(
                {h.spec.index: self._num_blocks[h.name] for h in self.decodes()},
                config.block_size,
            )
        self._num_prefills: dict[str, int] = {}
        """Prefills each prefill instance completed (PrefillDone messages)."""

    # ---- start-up ----------------------------------------------------------------------

    def _launch(self) -> list[InstanceHandle]:
        if self.disagg_config.launcher == "ray":
            from distserve_rt.engine.disagg.ray_launcher import launch_ray_instances

            return launch_ray_instances(  # type: ignore[return-value]
                self.config, self.placement, self.disagg_config, self.fault_plan
            )
        in_process = self.disagg_config.launcher == "thread"
        specs = instance_specs(
            self.config, self.placement, self.disagg_config, self.transport_name, self.fault_plan
        )
        return [InstanceHandle(spec, in_process) for spec in specs]

    def _wait_ready(self):
        deadline = time.monotonic() + self.disagg_config.startup_timeout_s
        readies: dict[int, msg.Ready] = {}
        while len(readies) < len(self.instances):
            for i, handle in enumerate(self.instances):
                if i in readies:
                    continue
                if handle.conn.poll(0.01):
                    reply = handle.recv()
                    if not isinstance(reply, msg.Ready):
                        why = handle.describe_start_failure(reply)
                        raise RuntimeError(f"{handle.name} failed to start: {why}")
                    readies[i] = reply
                elif not handle.is_running():
                    raise RuntimeError(f"{handle.name} exited during start-up")
            if time.monotonic() > deadline:
                missing = [h.name for i, h in enumerate(self.instances) if i not in readies]
                raise TimeoutError(
                    f"instances {missing} not ready after startup_timeout_s="
                    f"{self.disagg_config.startup_timeout_s}"
                )
        self._num_blocks = {h.name: readies[i].num_blocks for i, h in enumerate(self.instances)}
        descriptors = {
            h.spec.index: readies[i].pool_descriptors
            for i, h in enumerate(self.instances)
            if h.role is InstanceRole.PREFILL
        }
        for handle in self.decodes():
            # Ray: each rank pair's transport is chosen by where its ranks run (ray_launcher).
            handle.send(msg.PeerPools(handle.select_peer_descriptors(descriptors)))  # type: ignore[arg-type]
        # Mapping a peer pool (MAP_POPULATE) takes seconds for a GiB pool: wait for it here,
        # or the first requests' transfer queue time would include it.
        while not all(h.name in self._peers_opened for h in self.decodes()):
            self._receive(0.05)
            dead = [h.name for h in self.decodes() if not h.alive]
            if dead:
                raise RuntimeError(f"decode instances {dead} died while opening the prefill pools")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "decode instances did not open the prefill pools within "
                    f"startup_timeout_s={self.disagg_config.startup_timeout_s}"
                )
        logger.info(
            "disaggregated: %s (transport %s)",
            ", ".join(f"{h.name} pid {h.pid} {_where(h)}" for h in self.instances),
            self.transport_name,
        )
        return readies[0].model_config

    # ---- instances ------------------------------------------------------------------------

    def prefills(self, alive_only: bool = True) -> list[InstanceHandle]:
        return [
            h for h in self.instances
            if h.role is InstanceRole.PREFILL and (h.alive or not alive_only)
        ]  # fmt: skip

    def decodes(self, alive_only: bool = True) -> list[InstanceHandle]:
        return [
            h for h in self.instances
            if h.role is InstanceRole.DECODE and (h.alive or not alive_only)
        ]  # fmt: skip

    def prefill(self, index: int) -> InstanceHandle:
        return self.prefills(alive_only=False)[index]

    def decode(self, index: int) -> InstanceHandle:
        return self.decodes(alive_only=False)[index]

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        stream: bool = False,
    ) -> None:
        """Queues a request on the prefill instance with the fewest queued tokens; with
        ``n > 1`` or ``best_of``, its child requests (`disagg/fanout.py`), each on its own.
        Raises ValueError for invalid input, EngineDeadError when no prefill instance
        lives; then nothing is queued."""
        if self._in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        now = time.monotonic() if arrival_time is None else arrival_time
        params = sampling_params or SamplingParams()
        fan, children = self._admit(request_id, prompt, prompt_token_ids, params, now, stream)
        if not self.prefills():
            raise EngineDeadError("every prefill instance is dead")
        for tracked in children:
            self.requests[tracked.request_id] = tracked
            if fan is not None:
                self.fan_outs[tracked.request_id] = fan
        self._stats.observe(busy=True)
        for tracked in children:
            self.dispatch_prefill(tracked)

    def _admit(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        now: float,
        stream: bool,
    ) -> tuple[fanout.FanOut | None, list[TrackedRequest]]:
        """The requests to dispatch: the request itself, or its parent's children (then
        with their `FanOut`). ValueError for invalid input."""
        checks = dict(
            model_config=self.model_config,
            max_model_len=self.scheduler_config.max_model_len,
            tokenizer=self.tokenizer,
        )
        if params.num_sequences == 1:
            args = (request_id, prompt, prompt_token_ids, params, now, stream)
            return None, [admission.admit(*args, **checks)]
        fan = fanout.fan_out(
            request_id, prompt, prompt_token_ids, params, now, stream,
            max_num_seqs=self.scheduler_config.max_num_seqs, in_use=self._in_use, **checks,
        )  # fmt: skip
        return fan, fan.children

    def _in_use(self, request_id: str) -> bool:
        """A live request's id, or a finished child's whose parent still runs."""
        return request_id in self.requests or request_id in self.fan_outs

    def dispatch_prefill(self, tracked: TrackedRequest) -> None:
        live = self.prefills()
        if not live:
            self.finish(tracked, FinishReason.ERROR, error="no prefill instance is alive")
            return
        if tracked.num_retries == 0 and self._prefill_on_decode(tracked, live):
            return
        target = live[pick_prefill([h.num_queued_tokens for h in live])]
        tracked.phase = Phase.PREFILLING
        tracked.prefill_index = target.spec.index
        tracked.decode_index = None
        tracked.num_queued_tokens = len(tracked.token_ids)
        target.num_queued_tokens += tracked.num_queued_tokens
        target.send(
            msg.NewRequest(
                tracked.request_id,
                tracked.token_ids,
                tracked.num_prompt_tokens,
                tracked.request.sampling_params,
                tracked.request.arrival_time,
            )
        )

    def _prefill_on_decode(self, tracked: TrackedRequest, prefills: list[InstanceHandle]) -> bool:
        """Conditional disaggregation: sends the request to a decode instance to be
        prefilled there when `prefill_locally` says so; False when it goes to a prefill
        instance (the thresholds are off by default). A retried request never does."""
        dc = self.disagg_config
        if not (dc.local_prefill_max_tokens or dc.local_prefill_min_queue_tokens):
            return False
        target, num_cached_blocks = self.route_decode(tracked.token_ids)
        if target is None:
            return False
        num_uncached = len(tracked.token_ids) - num_cached_blocks * self.config.block_size
        num_queued = min(h.num_queued_tokens for h in prefills)
        if not prefill_locally(
            num_uncached, num_queued, max_uncached_tokens=dc.local_prefill_max_tokens,
            min_prefill_queue_tokens=dc.local_prefill_min_queue_tokens,
            num_prompt_tokens=len(tracked.token_ids),
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
        ):  # fmt: skip
            return False
        tracked.phase = Phase.DECODING  # its first token comes as Tokens from the decode side
        tracked.prefill_index = None
        tracked.decode_index = target.spec.index
        target.num_assigned += 1
        self._record_decode_prefix(target.spec.index, tracked.token_ids)
        target.send(
            msg.NewRequest(
                tracked.request_id, tracked.token_ids, tracked.num_prompt_tokens,
                tracked.request.sampling_params, tracked.request.arrival_time,
            )
        )  # fmt: skip
        return True

    def route_decode(self, token_ids: Sequence[int]) -> tuple[InstanceHandle | None, int]:
        """The decode instance for a request of `token_ids` (its KV: all but the last) and
        the blocks of it that instance likely holds cached: the longest cached prefix within
        DisaggConfig.max_decode_load_imbalance of the least loaded, else the least loaded."""
        live = self.decodes()
        if not live:
            return None, 0
        if self.decode_prefixes is None:
            return self.least_loaded_decode(), 0
        hashes = self.decode_prefixes.block_hashes(token_ids[:-1])
        free = [h.status.num_free_blocks if h.status is not None else 0 for h in live]
        pos, num_cached = self.decode_prefixes.pick(
            [h.spec.index for h in live], hashes, [h.num_assigned for h in live], free,
            self.disagg_config.max_decode_load_imbalance,
        )  # fmt: skip
        return live[pos], num_cached

    def _record_decode_prefix(self, decode_index: int, token_ids: Sequence[int]) -> None:
        """Decode instance `decode_index` will hold the KV of ``token_ids[:-1]`` cached."""
        if self.decode_prefixes is not None:
            hashes = self.decode_prefixes.block_hashes(token_ids[:-1])
            self.decode_prefixes.record(decode_index, hashes)

    def abort_request(self, request_id: str) -> bool:
        """Aborts a live request wherever it is (finish_reason "abort" at once); its KV is
        freed by the instances. A parent's (or any child's) id aborts every live child.
        False when the id is unknown or finished."""
        fan = self.fan_outs.get(request_id)
        ids = [request_id] if fan is None else [c.request_id for c in fan.children]
        # A list, not any(): every child is aborted.
        aborted = [self._abort_one(i) for i in ids]
        return any(aborted)

    def _abort_one(self, request_id: str) -> bool:
        tracked = self.requests.get(request_id)
        if tracked is None:
            return False
        if tracked.phase is Phase.PREFILLING:
            self.prefill(tracked.prefill_index).send(msg.Abort(request_id))  # type: ignore[arg-type]
        else:
            self.decode(tracked.decode_index).send(msg.Abort(request_id))  # type: ignore[arg-type]
            migration = self.migrations.get(request_id)
            if migration is not None:
                # Its source KV stays held until the decode instance's MigrationDone says
                # nothing reads it (or recovery.on_instance_death, if it dies first).
                migration.apply(MigrationEvent.ABORTED, time.monotonic())
        self.finish(tracked, FinishReason.ABORT)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._outputs) or bool(self._changed_fan_outs)

    @property
    def num_unfinished_requests(self) -> int:
        """Live requests as the caller added them: a parent counts once (as colocated)."""
        parents = {self.fan_outs[i].request_id if i in self.fan_outs else i for i in self.requests}
        return len(parents)

    # ---- the loop -------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.05) -> list[RequestOutput]:
        """Handles the instances' messages (waiting up to `timeout_s` for the first);
        returns the outputs of finished requests and the new tokens of streaming ones."""
        if not self._outputs and not self._changed_fan_outs:
            self._receive(timeout_s)
        self._stats.observe(busy=bool(self.requests))
        self._stats.maybe_log(self.stats)
        outputs, self._outputs = self._outputs, []
        return outputs + self._fan_out_outputs()

    def enable_step_log(self, capacity: int) -> InstanceStepLogs:
        """Starts every live instance's step log (its last ``capacity`` steps); the
        returned object's `records` stops them and gathers what they hold."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"step log capacity must be a positive int, got {capacity!r}")
        for handle in self.instances:
            if handle.alive:
                handle.send(msg.StepLogControl(capacity))
        return InstanceStepLogs(self._collect_step_logs)

    def disable_step_log(self, timeout_s: float = 30.0) -> None:
        """Stops the instances' step logs, dropping what they hold (take it first with the
        `InstanceStepLogs.records` that `enable_step_log` returned)."""
        self._collect_step_logs(timeout_s)

    def _collect_step_logs(self, timeout_s: float) -> dict[str, list[dict]]:
        """Stops the live instances' step logs and waits for their records (messages that
        arrive meanwhile are handled as in `step`; outputs stay queued for it)."""
        live = [h for h in self.instances if h.alive]
        self._step_log_replies = {}
        for handle in live:
            handle.send(msg.StepLogControl(0))
        deadline = time.monotonic() + timeout_s
        while any(h.alive and h.name not in self._step_log_replies for h in live):
            if time.monotonic() > deadline:
                missing = [h.name for h in live if h.name not in self._step_log_replies]
                raise TimeoutError(f"no step log from {missing} after {timeout_s} s")
            self._receive(0.05)
        # In the instances' order (prefill first), not the order the replies came in.
        return {
            h.name: self._step_log_replies[h.name] for h in live if h.name in self._step_log_replies
        }

    def _receive(self, timeout_s: float) -> None:
        live = [h for h in self.instances if h.alive]
        waitables: list = [h.conn for h in live] + [h.sentinel for h in live if h.sentinel]
        for ready in connection.wait(waitables, timeout_s):
            for handle in live:
                if ready is handle.conn and handle.alive:
                    self._drain(handle)
                elif ready == handle.sentinel and handle.alive:
                    self._drain(handle)  # what it sent before dying still counts
                    why = handle.death_reason or "its process exited"
                    recovery.on_instance_death(self, handle, why)
        for handle in live:
            if handle.alive and handle.sentinel is None and not handle.is_running():
                recovery.on_instance_death(self, handle, "its thread exited")

    def _drain(self, handle: InstanceHandle) -> None:
        try:
            while handle.alive and handle.conn.poll():
                self._handle_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            recovery.on_instance_death(self, handle, "its pipe closed")

    def _handle_message(self, handle: InstanceHandle, m: object) -> None:
        if isinstance(m, msg.InstanceStatus):
            handle.status = m
        elif isinstance(m, msg.StepLogRecords):
            self._step_log_replies[handle.name] = m.records
        elif isinstance(m, msg.PeersOpened):
            self._peers_opened.add(m.name)
        elif isinstance(m, msg.PrefillDone):
            self._num_prefills[handle.name] = self._num_prefills.get(handle.name, 0) + 1
            self._record_prefill(m)
            self._on_prefill_done(handle, m)
        elif isinstance(m, msg.Tokens):
            self._stats.record(num_decode_tokens=len(m.token_ids))
            self._on_tokens(m)
        elif isinstance(m, msg.MigrationDone):
            self._on_migration_done(m)
        elif isinstance(m, msg.LeaseExpired):
            recovery.on_lease_expired(self, m)
        elif isinstance(m, msg.RevokeResult):
            recovery.on_revoke_result(self, m)
        elif isinstance(m, msg.Fatal):
            recovery.on_instance_death(self, handle, m.error)
        else:
            raise RuntimeError(f"unexpected message from {handle.name}: {m!r}")

    def _record_prefill(self, m: msg.PrefillDone) -> None:
        tracked = self.requests.get(m.request_id)
        if tracked is not None and tracked.phase is Phase.PREFILLING:
            # Before the first token is appended: every token so far was prefilled (a
            # retried request prefills its generated tokens too).
            self._stats.record(num_prefill_tokens=len(tracked.token_ids))

    def _on_prefill_done(self, handle: InstanceHandle, m: msg.PrefillDone) -> None:
        tracked = self.requests.get(m.request_id)
        if tracked is None or tracked.phase is not Phase.PREFILLING:
            if m.finish_reason is None:
                handle.send(msg.ReleaseKV(m.request_id))  # aborted meanwhile: nobody pulls
            return
        handle.num_queued_tokens -= tracked.num_queued_tokens
        tracked.num_queued_tokens = 0
        tracked.prefill_start_time = m.prefill_start_time
        tracked.prefill_end_time = m.time
        logprobs = None if m.logprobs is None else [m.logprobs]
        stopped = tracked.append_tokens([m.token_id], m.time, logprobs)
        tracked.generator_state = m.generator_state
        if m.finish_reason is not None:
            self.finish(tracked, m.finish_reason, m.stop_reason)
            return
        if stopped is not None:  # a stop string: the KV awaiting migration is not needed
            handle.send(msg.ReleaseKV(m.request_id))
            self.finish(tracked, stopped.finish_reason, stopped.stop_reason)  # type: ignore[arg-type]
            return
        self._emit_stream(tracked)
        target, _ = self.route_decode(tracked.token_ids)
        if target is None:
            handle.send(msg.ReleaseKV(m.request_id))
            self.finish(tracked, FinishReason.ERROR, error="no decode instance is alive")
            return
        migration = Migration(m.request_id, handle.spec.index, target.spec.index, m.block_ids)
        self.migrations[m.request_id] = migration
        tracked.phase = Phase.MIGRATING
        self.send_migration(tracked, migration)

    def send_migration(self, tracked: TrackedRequest, migration: Migration) -> None:
        """Announces `migration` to its decode instance (first, or re-forwarded)."""
        target = self.decode(migration.decode_index)
        target.num_assigned += 1
        tracked.decode_index = migration.decode_index
        self._record_decode_prefix(migration.decode_index, tracked.token_ids)
        target.send(
            msg.Migrate(
                tracked.request_id, migration.prefill_index, migration.block_ids,
                tracked.token_ids, tracked.num_prompt_tokens, tracked.request.sampling_params,
                tracked.request.arrival_time, tracked.generator_state,
            )
        )  # fmt: skip

    def least_loaded_decode(self) -> InstanceHandle | None:
        """The live decode instance with the fewest requests (ties: most free blocks)."""
        live = self.decodes()
        return min(live, key=_decode_load) if live else None

    def settle_migration(self, migration: Migration) -> None:
        """A migration reached a final state: nothing reads its source KV any more, so the
        prefill instance frees it (and may reuse the blocks: never forward them again)."""
        assert migration.state.is_final, migration.state
        self.prefill(migration.prefill_index).send(msg.ReleaseKV(migration.request_id))
        del self.migrations[migration.request_id]

    def _on_migration_done(self, m: msg.MigrationDone) -> None:
        migration = self.migrations.get(m.request_id)
        if migration is None:
            return  # settled already (its decode instance was declared dead)
        event = MigrationEvent.PULL_SUCCEEDED if m.ok else MigrationEvent.PULL_FAILED
        migration.apply(event, m.pull_end_time)
        self.settle_migration(migration)
        tracked = self.requests.get(m.request_id)
        if tracked is None or tracked.phase is not Phase.MIGRATING:
            return
        tracked.pull_start_time, tracked.pull_end_time = m.pull_start_time, m.pull_end_time
        if m.ok:
            tracked.phase = Phase.DECODING
            tracked.transfer_bytes = m.num_bytes
        # A failed pull is ended by the decode instance's Tokens message.

    def _on_tokens(self, m: msg.Tokens) -> None:
        tracked = self.requests.get(m.request_id)
        if tracked is None:
            return  # aborted at the controller already
        if m.first_decode_time is not None:
            tracked.first_decode_time = m.first_decode_time
        if tracked.prefill_index is None and m.token_ids and not tracked.output_token_ids:
            # The first token of a request prefilled on its decode instance.
            self._stats.record(num_prefill_tokens=len(tracked.token_ids))
        stopped = tracked.append_tokens(m.token_ids, m.time, m.logprobs)
        if m.finish_reason is not None:
            self.finish(tracked, m.finish_reason, m.stop_reason, m.error)
        elif stopped is not None:
            # A stop string the decode instance cannot see: it would decode on; the abort
            # frees its KV, and tokens it sent meanwhile are dropped (the request is gone).
            self.decode(tracked.decode_index).send(msg.Abort(m.request_id))  # type: ignore[arg-type]
            self.finish(tracked, stopped.finish_reason, stopped.stop_reason)  # type: ignore[arg-type]
        elif m.token_ids:
            self._emit_stream(tracked)

    # ---- outputs --------------------------------------------------------------------------

    def _emit_stream(self, tracked: TrackedRequest) -> None:
        if tracked.stream:
            self._publish(tracked)

    def _publish(self, tracked: TrackedRequest) -> None:
        """Queues the request's output, or marks its parent's due: a streaming parent on
        every child's change, any parent when its last child finishes."""
        fan = self.fan_outs.get(tracked.request_id)
        if fan is None:
            self._outputs.append(tracked.to_output(self.tokenizer))
        elif fan.stream or fan.is_finished:
            self._changed_fan_outs[fan.request_id] = fan

    def _fan_out_outputs(self) -> list[RequestOutput]:
        """The due parents' outputs; a finished parent's child ids are free again."""
        outputs = []
        for fan in self._changed_fan_outs.values():
            outputs.append(fan.output(self.tokenizer))
            if fan.is_finished:
                for child in fan.children:
                    del self.fan_outs[child.request_id]
        self._changed_fan_outs.clear()
        return outputs

    def finish(
        self,
        tracked: TrackedRequest,
        finish_reason: FinishReason,
        stop_reason: int | str | None = None,
        error: str | None = None,
    ) -> None:
        self.requests.pop(tracked.request_id, None)
        if tracked.decode_index is not None and finish_reason is not FinishReason.ERROR:
            # Its decode instance keeps every full block it computed, output included.
            self._record_decode_prefix(tracked.decode_index, tracked.token_ids)
        self.release_load(tracked)
        tracked.finish(finish_reason, stop_reason, error, time.monotonic())
        self._publish(tracked)

    def release_load(self, tracked: TrackedRequest) -> None:
        if tracked.num_queued_tokens and tracked.prefill_index is not None:
            self.prefill(tracked.prefill_index).num_queued_tokens -= tracked.num_queued_tokens
            tracked.num_queued_tokens = 0
        if tracked.decode_index is not None:
            self.decode(tracked.decode_index).num_assigned -= 1
            tracked.decode_index = None

    # ---- stats, health, shutdown ----------------------------------------------------------

    def stats(self) -> EngineStats:
        instances, totals = [], TransferTotals(transport=self.transport_name)
        for h in self.instances:
            s = h.status
            instances.append(
                InstanceStats(
                    h.name, h.role.value, s.num_running if s else 0, s.num_waiting if s else 0,
                    s.kv_usage if s else 0.0, alive=h.alive,
                    prefix_cache_queries=s.prefix_cache_queries if s else 0,
                    prefix_cache_hits=s.prefix_cache_hits if s else 0,
                    num_prefills=self._prefill_count(h),
                    num_blocks_pulled=s.num_blocks_pulled if s else 0,
                    num_blocks_reused=s.num_blocks_reused if s else 0,
                )
            )  # fmt: skip
            if s is not None:
                totals.num_transfers += s.num_transfers
                totals.num_failures += s.num_transfer_failures
                totals.bytes += s.transfer_bytes
                totals.seconds += s.transfer_seconds
        return EngineStats(instances, totals)

    def _prefill_count(self, handle: InstanceHandle) -> int:
        """Prefills the instance ran: disaggregated ones (prefill instances, counted here)
        or local ones (decode instances, from their reports)."""
        if handle.role is InstanceRole.PREFILL:
            return self._num_prefills.get(handle.name, 0)
        return handle.status.num_local_prefills if handle.status is not None else 0

    def check_health(self) -> None:
        if self._closed:
            raise EngineDeadError("the controller was shut down")
        for role, live in (("prefill", self.prefills()), ("decode", self.decodes())):
            if not live:
                raise EngineDeadError(f"every {role} instance is dead")

    def shutdown(self) -> None:
        """Stops every instance (Shutdown, then kill after 10 s), unlinks their KV pools."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        for tracked in list(self.requests.values()):
            self.finish(tracked, FinishReason.ABORT)

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _stop_all(instances: list[InstanceHandle]) -> None:
    stop_children(instances)
    from distserve_rt.transfer.shm_region import sweep_stale_regions

    sweep_stale_regions()  # pools of instances that were killed (SIGKILL skips cleanup)


def _where(handle: InstanceHandle) -> str:
    device = torch.device(handle.spec.engine_config.device)
    if device.type == "cpu":
        return f"cores {handle.spec.cpu_cores}"
    first, last = device.index, device.index + handle.spec.num_ranks - 1  # type: ignore[operator]
    return f"GPU {first}" if first == last else f"GPUs {first}-{last}"


def _decode_load(handle: InstanceHandle) -> tuple[int, int]:
    free = handle.status.num_free_blocks if handle.status is not None else 0
    return decode_load(handle.num_assigned, free)

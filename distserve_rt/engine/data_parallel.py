"""`DataParallelCore`: N colocated replicas behind one `EngineCore` (vLLM's
``--data-parallel-size`` with internal load balancing).

Each replica is a whole colocated `LLMEngine` (TP x PP as the config says) in its own
process (`data_parallel_replica`), on its own devices: on CPU pinned to its share of this
process's cores, on GPU the next ``tp * pp`` GPUs. A request goes to the live replica with
the fewest unfinished requests (then the fewest queued prompt tokens); with the prefix
cache on, to the one that likely holds the longest prefix of its prompt, while that one
has at most ``DisaggConfig.max_decode_load_imbalance`` requests more than the least
loaded (the controller's cache-aware rule, `core.cache_routing`): a conversation's next
turn finds its KV, as the planner's multi-turn plans assume. Aborts go to the replica
holding the request, and a replica that dies fails only its own requests (finish reason
"error"); the others keep serving.

Admission checks run here, as in the colocated engine (`request_checks`), so bad input is
a ValueError from `add_request`, never a replica failure.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Sequence
from multiprocessing import connection

from distserve_rt.config import DisaggConfig, EngineConfig
from distserve_rt.config.parallelism import check_parallel_sizes
from distserve_rt.engine import data_parallel_replica as rep
from distserve_rt.engine.data_parallel_replica import (
    ReplicaSpec,
    describe_devices,
    replica_specs,
    run_replica,
)
from distserve_rt.engine.disagg.child import ChildHandle, stop_children
from distserve_rt.engine.disagg.routing import DecodePrefixIndex
from distserve_rt.engine.protocol import EngineDeadError, EngineStats, InstanceStats
from distserve_rt.engine.request_checks import check_request
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.logger import init_logger
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.worker.multiproc_executor import load_model_config

logger = init_logger(__name__)


class ReplicaHandle(ChildHandle):
    """The core's end of one replica: pipe, liveness, its live requests, last load."""

    def __init__(self, spec: ReplicaSpec, in_process: bool) -> None:
        # A daemonic process may not start children: a TP x PP replica starts workers.
        single = spec.engine_config.parallelism.world_size == 1
        super().__init__(
            run_replica, spec, spec.name, in_process=in_process, daemon=single,
            sender_name=f"core-{spec.name}",
        )  # fmt: skip
        self.spec = spec
        self.requests: dict[str, rep.AddRequest] = {}
        """Live requests dispatched to it, by id."""
        self.last_outputs: dict[str, RequestOutput] = {}
        """Each request's latest output, once it has one (what it had when its replica
        died; the stats line counts the tokens added since)."""
        self.num_queued_tokens = 0
        """Prompt tokens of its live requests (the tie-break between equal counts)."""
        self.status = InstanceStats(spec.name, "colocated", 0, 0, 0.0)

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> tuple[int, int]:
        return len(self.requests), self.num_queued_tokens


class DataParallelCore:
    """`EngineCore` over ``config.data_parallel_size`` colocated replicas.

    Args:
        config: every replica's engine (its TP x PP); data_parallel_size >= 2.
        disagg_config: the instance-process knobs replicas share with disaggregated
            instances: ``launcher`` ("thread" for tests), ``pin_cpus``,
            ``startup_timeout_s``, ``stats_interval_s``.
        tokenizer: the model's (detokenizing happens in the replicas, which load it too).
    """

    def __init__(
        self, config: EngineConfig, disagg_config: DisaggConfig | None = None, *, tokenizer=None
    ) -> None:
        if config.data_parallel_size < 2:
            raise ValueError(
                f"DataParallelCore needs data_parallel_size >= 2, got "
                f"{config.data_parallel_size}; use LLMEngine for one replica"
            )
        self.config = config
        self.disagg_config = dc = disagg_config or DisaggConfig()
        self.tokenizer = tokenizer
        self.model_config = mc = load_model_config(config.model)
        # Refused here, before N replicas spawn only to fail alike.
        check_parallel_sizes(
            mc.num_heads, mc.num_kv_heads, mc.num_layers,
            config.tensor_parallel_size, config.pipeline_parallel_size,
        )  # fmt: skip
        self.scheduler_config = config.scheduler_config(self.model_config.max_position_embeddings)
        pin = dc.pin_cpus and dc.launcher == "process"
        specs = [
            dataclasses.replace(s, stats_interval_s=dc.stats_interval_s)
            for s in replica_specs(config, pin, detokenize=tokenizer is not None)
        ]
        self.replicas = [ReplicaHandle(s, dc.launcher == "thread") for s in specs]
        self._finalizer = weakref.finalize(self, stop_children, list(self.replicas))
        self._where: dict[str, ReplicaHandle] = {}
        self._outputs: list[RequestOutput] = []
        self._closed = False
        self._stats = StatsLogger(logger, config.log_stats_interval_s)
        """One stats line for all replicas (theirs are off), counted from their outputs."""
        self.prefixes: DecodePrefixIndex | None = None
        """What each replica (by position) likely holds cached; None: prefix caching off."""
        try:
            num_blocks = self._wait_ready(dc.startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        if config.enable_prefix_caching:
            self.prefixes = DecodePrefixIndex(dict(enumerate(num_blocks)), config.block_size)

    def _wait_ready(self, timeout_s: float) -> list[int]:
        """Waits for every replica; returns their pools' sizes in blocks (replica order)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.replicas)
        num_blocks = {}
        while pending:
            for handle in list(pending):
                if handle.conn.poll(0.01):
                    reply = handle.recv()
                    if not isinstance(reply, rep.ReplicaReady):
                        why = handle.describe_start_failure(reply)
                        raise RuntimeError(f"{handle.name} failed to start: {why}")
                    num_blocks[handle.name] = reply.num_blocks
                    pending.remove(handle)
                elif not handle.is_running():
                    raise RuntimeError(f"{handle.name} exited during start-up")
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"replicas {[h.name for h in pending]} not ready after "
                    f"startup_timeout_s={timeout_s}"
                )
        logger.info(
            "data parallel: %d replicas of (%s): %s",
            len(self.replicas),
            self.config.parallelism,
            ", ".join(f"{h.name} pid {h.pid} {describe_devices(h.spec)}" for h in self.replicas),
        )
        return [num_blocks[h.name] for h in self.replicas]

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
        """Sends the request to a live replica (`route`). ValueError for invalid input
        (the colocated engine's checks), EngineDeadError when no replica lives."""
        if request_id in self._where:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        token_ids, _ = check_request(
            request_id, prompt, prompt_token_ids, params, self.model_config
        )
        if params.stop and self.tokenizer is None:  # the replicas have none either
            raise ValueError(f"stop={params.stop!r} needs a detokenizer (none was given)")
        live = [h for h in self.replicas if h.alive]
        if not live:
            raise EngineDeadError("every data-parallel replica is dead")
        target = self.route(live, token_ids)
        now = time.monotonic() if arrival_time is None else arrival_time
        m = rep.AddRequest(request_id, token_ids, params, prompt, now, stream)
        target.requests[request_id] = m
        target.num_queued_tokens += len(token_ids)
        self._where[request_id] = target
        self._stats.observe(busy=True)
        target.send(m)

    def route(self, live: list[ReplicaHandle], token_ids: Sequence[int]) -> ReplicaHandle:
        """The replica for a prompt of ``token_ids``: the least loaded (fewest requests, then
        fewest queued prompt tokens), or with the prefix cache on the one likely holding the
        longest prefix of its blocks within the load cap (`pick_decode_instance`; the
        least-loaded order breaks ties). It is recorded as holding them from then on."""
        if self.prefixes is None:
            return min(live, key=ReplicaHandle.load)
        hashes = self.prefixes.block_hashes(token_ids)
        positions = [self.replicas.index(h) for h in live]
        pos, _ = self.prefixes.pick(
            positions, hashes, [len(h.requests) for h in live],
            [-h.num_queued_tokens for h in live],  # "most free" -> fewest queued tokens
            self.disagg_config.max_decode_load_imbalance,
        )  # fmt: skip
        self.prefixes.record(positions[pos], hashes)
        return live[pos]

    def abort_request(self, request_id: str) -> bool:
        """Forwards the abort to the request's replica (which reports it finished with
        "abort"); False when the id is unknown or finished."""
        handle = self._where.get(request_id)
        if handle is None:
            return False
        return handle.send(rep.Abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._where) or bool(self._outputs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._where)

    # ---- the loop -------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.05) -> list[RequestOutput]:
        """The replicas' outputs (waiting up to `timeout_s` for the first message)."""
        if not self._outputs:
            self._receive(timeout_s)
        self._stats.observe(busy=bool(self._where))
        self._stats.maybe_log(self.stats)
        outputs, self._outputs = self._outputs, []
        return outputs

    def _receive(self, timeout_s: float) -> None:
        live = [h for h in self.replicas if h.alive]
        waitables: list = [h.conn for h in live] + [h.sentinel for h in live if h.sentinel]
        for ready in connection.wait(waitables, timeout_s) if waitables else ():
            for handle in live:
                if ready is handle.conn or ready == handle.sentinel:
                    self._drain(handle)  # what it sent before dying still counts
                    if ready == handle.sentinel and handle.alive:
                        self._on_death(handle, "its process exited")
        for handle in live:
            if handle.alive and handle.sentinel is None and not handle.is_running():
                self._on_death(handle, "its thread exited")

    def _drain(self, handle: ReplicaHandle) -> None:
        try:
            while handle.alive and handle.conn.poll():
                self._handle_message(handle, handle.conn.recv())
        except (EOFError, OSError):
            self._on_death(handle, "its pipe closed")

    def _handle_message(self, handle: ReplicaHandle, m: object) -> None:
        if isinstance(m, rep.Outputs):
            handle.status = m.status
            for output in m.outputs:
                self._on_output(handle, output)
        elif isinstance(m, rep.Fatal):
            self._on_death(handle, m.error)

    def _on_output(self, handle: ReplicaHandle, output: RequestOutput) -> None:
        request_id = output.request_id
        self._record(handle, output)
        if output.finished:
            added = handle.requests.pop(request_id, None)
            if added is not None:
                handle.num_queued_tokens -= len(added.prompt_token_ids)
            handle.last_outputs.pop(request_id, None)
            self._where.pop(request_id, None)
        elif request_id in handle.requests:
            handle.last_outputs[request_id] = output
        self._outputs.append(output)

    def _record(self, handle: ReplicaHandle, output: RequestOutput) -> None:
        """Counts the tokens `output` adds for the stats line: the prompt once its first
        token exists, then each new token (non-streaming requests report at their end, so
        their tokens land in the window they finish in)."""
        last = handle.last_outputs.get(output.request_id)
        num_before = 0 if last is None else len(last.outputs[0].token_ids)
        num_new = len(output.outputs[0].token_ids) - num_before
        if num_before == 0 and num_new > 0:
            self._stats.record(num_prefill_tokens=len(output.prompt_token_ids))
            num_new -= 1  # the first token comes from the prefill
        self._stats.record(num_decode_tokens=max(num_new, 0))
        if output.finished:
            self._stats.record(num_preemptions=output.metrics.num_preemptions)

    def _on_death(self, handle: ReplicaHandle, why: str) -> None:
        """Fails the replica's live requests (only them: the others keep serving)."""
        if not handle.alive:
            return
        handle.alive = False
        logger.error(
            "data-parallel replica %s died (%s); failing its %d requests, %d of %d "
            "replicas serve on",
            handle.name, why.splitlines()[0], len(handle.requests),
            sum(h.alive for h in self.replicas), len(self.replicas),
        )  # fmt: skip
        error = f"data-parallel replica {handle.name} died: {why.splitlines()[0]}"
        for request_id, added in handle.requests.items():
            last = handle.last_outputs.get(request_id)
            self._outputs.append(rep.error_output(added, error, last))
            self._where.pop(request_id, None)
        handle.requests.clear()
        handle.last_outputs.clear()
        handle.num_queued_tokens = 0

    # ---- stats, health, shutdown ----------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats([dataclasses.replace(h.status, alive=h.alive) for h in self.replicas])

    def check_health(self) -> None:
        """EngineDeadError when shut down or when any replica died: a lost replica is not
        restarted, so the server runs below the planned capacity until it is replaced
        (the live replicas still serve meanwhile)."""
        if self._closed:
            raise EngineDeadError("the data-parallel engine was shut down")
        dead = [h.name for h in self.replicas if not h.alive]
        if dead:
            raise EngineDeadError(
                f"data-parallel replicas {dead} are dead; {len(self.replicas) - len(dead)} "
                f"of {len(self.replicas)} still serve"
            )

    def shutdown(self) -> None:
        """Stops every replica (Shutdown, then kill after 10 s); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> DataParallelCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

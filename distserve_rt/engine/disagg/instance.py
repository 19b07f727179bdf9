"""What prefill and decode instances share: their spec, model + KV pool set-up, the stop
rules, and the loop an instance process runs (receive -> schedule -> execute -> send).
"""

from __future__ import annotations

import abc
import enum
import itertools
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from distserve_rt.config import DisaggConfig, EngineConfig, Parallelism
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.core.request import Request
from distserve_rt.core.stop_checker import StopChecker
from distserve_rt.distributed.ray_ranks import RankPlacement
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.devices import make_transport
from distserve_rt.engine.disagg.faults import FaultPlan, FaultyTransport
from distserve_rt.engine.disagg.pipe_sender import PipeSender
from distserve_rt.engine.step_log import StepLog
from distserve_rt.logger import init_logger
from distserve_rt.transfer import KVTransport
from distserve_rt.worker.executor import Executor, UniprocExecutor
from distserve_rt.worker.multiproc_executor import MultiprocExecutor
from distserve_rt.worker.worker import Worker

logger = init_logger(__name__)


class InstanceRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """Everything an instance process is built from (pickled to the spawned process)."""

    role: InstanceRole
    index: int
    engine_config: EngineConfig
    """Model, device (this instance's), block size, limits."""
    disagg_config: DisaggConfig
    transport: str
    cpu_cores: tuple[int, ...] | None = None
    """Cores to pin the process to (None: no pinning); its worker processes split them."""
    prefill_parallelism: Parallelism = Parallelism()
    """TP x PP of the prefill instances (decode instances re-slice their KV by it)."""
    shares_gpu: bool = False
    """GPU: another instance uses one of this instance's GPUs (`devices.InstanceDevice`)."""
    fault_plan: FaultPlan | None = None
    """Tests (`faults.py`, thread launcher: the plan is shared, never pickled); None in
    production."""
    rank_placement: RankPlacement | None = None
    """launcher="ray", an instance spanning nodes: each rank's node and the placement group
    its bundles are in (`ray_launcher`); None: every rank spawned on this process's node."""

    @property
    def name(self) -> str:
        return f"{self.role.value}-{self.index}"

    @property
    def num_ranks(self) -> int:
        """Worker processes: tp x pp (1: the model runs in the instance's own process)."""
        return self.engine_config.parallelism.world_size


class Instance(abc.ABC):
    """One prefill or decode instance: an executor (a `Worker` in this process, or TP x PP
    worker processes, each with its part of the model and KV pool), a scheduler, an outbox.

    The loop calls `handle` for every incoming message, then `step(now)`, then sends what
    `take_outbox` returns. Nothing here blocks.
    """

    def __init__(self, spec: InstanceSpec) -> None:
        self.spec = spec
        config = spec.engine_config
        self.faults = spec.fault_plan
        self.clock: Callable[[], float] = time.monotonic if self.faults is None else self.faults.now
        """The instance's time (the loop's `now`): a fault plan's clock in tests."""
        self._transport: KVTransport | None = None
        self.worker: Worker | None = None
        """The model and pool in this process (None: they live in worker processes)."""
        self.executor: Executor
        if spec.num_ranks == 1:
            self.worker = Worker(
                config, allocate_pool=self._allocate_pool, shared_gpu=spec.shares_gpu
            )
            self.executor = UniprocExecutor(self.worker)
        else:
            from distserve_rt.engine.disagg.rank_kv import KVRankConfig, run_kv_worker

            is_prefill = spec.role is InstanceRole.PREFILL
            rank_config = KVRankConfig(is_prefill, spec.transport, spec.shares_gpu)
            # A prefill instance's seeded streams live in its sampling worker: it reports
            # them with each first token, so that they migrate (`PrefillDone`).
            starter = None
            if spec.rank_placement is not None:
                from distserve_rt.distributed.ray_ranks import RayRankStarter

                starter = RayRankStarter(spec.rank_placement, spec.name)
            self.executor = MultiprocExecutor(
                config, target=run_kv_worker, target_config=rank_config,
                report_generator_states=is_prefill, starter=starter,
            )  # fmt: skip
        self.model_config = self.executor.model_config
        self.scheduler_config = config.scheduler_config(self.model_config.max_position_embeddings)
        num_blocks = self.executor.init_kv_cache(self.scheduler_config)
        # A decode instance caches the blocks it pulled and decoded, so that a later turn
        # pulls only what it lacks (DisaggConfig.decode_prefix_caching turns that off alone).
        caching = config.enable_prefix_caching and (
            spec.role is InstanceRole.PREFILL or spec.disagg_config.decode_prefix_caching
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.watermark, enable_prefix_caching=caching
        )
        self.outbox: list[object] = []
        self._seq_ids = itertools.count()
        self.step_log: StepLog | None = None
        """Each executed step's batch shape and time while the controller asks for it
        (`StepLogControl`): the simulator's comparison reads the instances' steps."""

    def control_step_log(self, message: msg.StepLogControl) -> None:
        """Starts the step log, or stops it and queues what it held for the controller."""
        if message.capacity > 0:
            self.step_log = StepLog(message.capacity)
            return
        records = [] if self.step_log is None else self.step_log.records()
        self.step_log = None
        self.outbox.append(msg.StepLogRecords([r.to_dict() for r in records]))

    def record_step(self, batch, start: float, execute_s: float) -> None:
        """Logs a step that began at ``start`` (`time.perf_counter`) when the log is on."""
        if self.step_log is not None:
            self.step_log.record(batch, time.perf_counter() - start, execute_s, start)

    @property
    def transport(self) -> KVTransport:
        """The transport of the pool in this process, made on first use: the driver of a TP
        x PP instance never uses one (its ranks have theirs), and on GPU it must not
        create a CUDA context."""
        if self._transport is None:
            transport = make_transport(self.spec.transport, self.spec.engine_config.device)
            if self.faults is not None:
                transport = FaultyTransport(transport, self.faults)
            self._transport = transport
        return self._transport

    def _allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return allocate_kv_pool(spec, torch.device(self.spec.engine_config.device))

    def release(self, request: Request) -> None:
        """This instance samples no more tokens for `request` (drops remote sampler state)."""
        self.executor.release_requests([request.seq_id])

    @abc.abstractmethod
    def ready_message(self) -> msg.Ready: ...

    @abc.abstractmethod
    def handle(self, message: object, now: float) -> None: ...

    @abc.abstractmethod
    def step(self, now: float) -> None:
        """Schedules and runs one batch (if any); queues the resulting messages."""

    @abc.abstractmethod
    def poll_interval_s(self) -> float:
        """How long the loop may wait for messages before the next step: 0 with work to
        compute, short with transfers in flight, longer when idle."""

    @abc.abstractmethod
    def status(self) -> msg.InstanceStatus: ...

    def take_outbox(self) -> list[object]:
        out, self.outbox = self.outbox, []
        return out

    def make_request(self, m: msg.NewRequest | msg.Migrate) -> Request:
        """A `Request` of this instance for the controller's request (prompt + generated)."""
        request = Request(
            m.request_id,
            next(self._seq_ids),
            m.token_ids[: m.num_prompt_tokens],
            m.sampling_params,
            m.arrival_time,
            self.scheduler_config.max_model_len,
        )
        request.token_ids.extend(m.token_ids[m.num_prompt_tokens :])
        # The token stop rules (`Scheduler.update_from_output` applies them); stop strings
        # need the text: the controller applies them and aborts the request here.
        request.stop_checker = StopChecker(
            m.sampling_params,
            eos_token_id=self.model_config.eos_token_id,
            num_prompt_tokens=m.num_prompt_tokens,
            max_model_len=self.scheduler_config.max_model_len,
            detokenizer=None,
            num_output_tokens=len(m.token_ids) - m.num_prompt_tokens,
            apply_stop_strings=False,
        )
        if m.sampling_params.logprobs is not None:
            request.logprobs = []
        return request

    def finished_tokens(self, request: Request, now: float) -> msg.Tokens:
        """The message ending `request` (no new token)."""
        return msg.Tokens(
            request.request_id, [], now, request.finish_reason, request.stop_reason, request.error
        )

    def close(self) -> None:
        self.executor.shutdown()
        if self._transport is not None:
            self._transport.close()


# ---- the process ---------------------------------------------------------------------------


def run_instance(spec: InstanceSpec, conn: Connection, in_process: bool = False) -> None:
    """Entry point of an instance (a spawned process, or a thread with `in_process`).

    Returns when the controller sends Shutdown or its end of the pipe closes (the
    controller died: an orphan instance must not live on).
    """
    instance: Instance | None = None
    sender = PipeSender(conn, spec.name)
    try:
        if not in_process:
            _configure_process(spec)
        instance = build_instance(spec)
        sender.send(instance.ready_message())
        _loop(instance, conn, sender)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the controller is gone
    except Exception:  # noqa: BLE001 (reported to the controller, then the process ends)
        error = f"{spec.name} failed:\n{traceback.format_exc()}"
        logger.error("%s", error)
        sender.send(msg.Fatal(error))
    finally:
        sender.close()
        if instance is not None:
            instance.close()


def build_instance(spec: InstanceSpec) -> Instance:
    if spec.role is InstanceRole.PREFILL:
        from distserve_rt.engine.disagg.prefill_instance import PrefillInstance

        return PrefillInstance(spec)
    from distserve_rt.engine.disagg.decode_instance import DecodeInstance

    return DecodeInstance(spec)


def _configure_process(spec: InstanceSpec) -> None:
    """Makes the instance's GPU the current device (before anything creates a CUDA
    context: kernels launch on the current device's stream), or pins the process to its
    cores and sizes the thread pools to them."""
    device = torch.device(spec.engine_config.device)
    if device.type == "cuda" and spec.num_ranks == 1:
        # A TP x PP instance's process holds no model and stays CUDA-free: each of its
        # worker processes sets its own GPU (distributed.launch._bootstrap).
        torch.cuda.set_device(device)
    if spec.cpu_cores is None:
        return
    from distserve_rt import ops

    os.sched_setaffinity(0, spec.cpu_cores)
    torch.set_num_threads(len(spec.cpu_cores))
    ops.set_num_threads(len(spec.cpu_cores))


def _loop(instance: Instance, conn: Connection, sender: PipeSender) -> None:
    interval = instance.spec.disagg_config.stats_interval_s
    next_status = 0.0
    while True:
        if conn.poll(instance.poll_interval_s()):
            while conn.poll():
                message = conn.recv()
                if isinstance(message, msg.Shutdown):
                    return
                if isinstance(message, msg.StepLogControl):
                    instance.control_step_log(message)
                    continue
                instance.handle(message, instance.clock())
        instance.step(instance.clock())
        for message in instance.take_outbox():
            sender.send(message)
        # Load reports go out on real time even when a test drives the instance's clock.
        if (t := time.monotonic()) >= next_status:
            sender.send(instance.status())
            next_status = t + interval
        if sender.error is not None:
            raise EOFError("the controller closed the pipe") from sender.error

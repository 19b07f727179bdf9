"""One data-parallel replica: a whole colocated `LLMEngine` in its own process (or a thread,
for fast tests), driven over a pipe by `data_parallel.DataParallelCore`; its spec and the
devices each replica gets (`replica_specs`).

The messages are small slots dataclasses pickled by the pipe; outputs travel as the
engine's own `RequestOutput`s, so a replica's outputs are exactly a single engine's.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from distserve_rt.config import EngineConfig
from distserve_rt.core.stop_checker import FinishReason

# The messages a replica shares with a disaggregated instance.
from distserve_rt.engine.disagg.messages import Abort, Fatal, Shutdown
from distserve_rt.engine.disagg.pipe_sender import PipeSender
from distserve_rt.engine.protocol import InstanceStats
from distserve_rt.logger import init_logger
from distserve_rt.outputs import CompletionOutput, RequestMetrics, RequestOutput
from distserve_rt.sampling_params import SamplingParams

logger = init_logger(__name__)

IDLE_POLL_S = 0.05
"""How long an idle replica waits for a message before looking again (a busy one steps)."""

# ---- core -> replica -------------------------------------------------------------------------


@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None
    arrival_time: float
    stream: bool


# ---- replica -> core -------------------------------------------------------------------------


@dataclass(slots=True)
class ReplicaReady:
    name: str
    model_config: object
    num_blocks: int
    """Its KV pool, in blocks (what the core's prefix index keeps per replica)."""


@dataclass(slots=True)
class Outputs:
    """What one step returned, and the replica's load after it."""

    outputs: list[RequestOutput]
    status: InstanceStats


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """Everything a replica is built from (pickled to the spawned process)."""

    index: int
    engine_config: EngineConfig
    """data_parallel_size 1, the replica's own device ("cuda:<first GPU>" on GPU)."""
    cpu_cores: tuple[int, ...] | None = None
    """CPU: cores to pin the process to (its TP x PP workers split them); None: no pinning."""
    detokenize: bool = True
    """Load the model's tokenizer (text, stop strings); False: token ids only."""
    stats_interval_s: float = 0.05
    """Seconds between load reports of a busy replica whose steps finish nothing."""

    @property
    def name(self) -> str:
        return f"colocated-{self.index}"


def replica_specs(config: EngineConfig, pin: bool, detokenize: bool = True) -> list[ReplicaSpec]:
    """One spec per replica, each with data_parallel_size 1 and its own devices.

    GPU (``device="cuda"``): replica i uses GPUs ``i * tp * pp`` onwards (rank r of its
    workers GPU first + r, as `distributed.launch.LaunchConfig` numbers them); ValueError
    for ``cuda:<i>`` or too few GPUs. CPU with `pin`: disjoint equal shares of this
    process's cores; ValueError when there are fewer cores than replicas."""
    num = config.data_parallel_size
    # The core logs one line for all replicas: N unnamed lines would be unreadable.
    base = config.replace(data_parallel_size=1, log_stats_interval_s=0.0)
    if config.device.startswith("cuda"):
        firsts = _replica_gpus(config)
        return [
            ReplicaSpec(i, base.replace(device=f"cuda:{firsts[i]}"), detokenize=detokenize)
            for i in range(num)
        ]
    if not pin:
        return [ReplicaSpec(i, base, detokenize=detokenize) for i in range(num)]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < num:
        raise ValueError(
            f"data_parallel_size={num} pins each replica to its own CPU cores but only "
            f"{len(cores)} are available ({cores}); lower data_parallel_size or set "
            "DisaggConfig(pin_cpus=False) (drt-run: --no-pin-cpus) to share them"
        )
    share = len(cores) // num  # its TP x PP workers split it (as disaggregated instances do)
    return [
        ReplicaSpec(i, base, tuple(cores[i * share : (i + 1) * share]), detokenize)
        for i in range(num)
    ]


def _replica_gpus(config: EngineConfig) -> list[int]:
    """The first GPU of each replica; ValueError when they do not fit the visible GPUs."""
    import torch

    num, world = config.data_parallel_size, config.parallelism.world_size
    if config.device != "cuda":
        raise ValueError(
            f"device={config.device!r}: data-parallel replicas get GPUs in order (replica i "
            f"the {world} from GPU i x {world}); pass device='cuda' and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num * world > visible:
        raise ValueError(
            f"data_parallel_size={num} x tensor_parallel_size x pipeline_parallel_size="
            f"{world} needs {num * world} GPUs, {visible} are visible; lower a size"
        )
    return [i * world for i in range(num)]


def describe_devices(spec: ReplicaSpec) -> str:
    """E.g. "cores (0,)" or "cuda:2" (the start-up log line)."""
    device = spec.engine_config.device
    if device == "cpu":
        return "cores " + ("shared" if spec.cpu_cores is None else str(spec.cpu_cores))
    return device


def run_replica(spec: ReplicaSpec, conn: Connection, in_process: bool = False) -> None:
    """Entry point of a replica: builds its engine, reports ReplicaReady, then steps and answers
    messages until Shutdown or until the core's end of the pipe closes (an orphan replica
    must not live on)."""
    from distserve_rt.engine.core import load_tokenizer
    from distserve_rt.engine.llm_engine import LLMEngine
    from distserve_rt.worker.multiproc_executor import load_model_config

    sender = PipeSender(conn, spec.name)
    engine = None
    try:
        if not in_process:
            _configure_process(spec)
        config = spec.engine_config
        model_config = load_model_config(config.model)
        tokenizer = load_tokenizer(config, model_config) if spec.detokenize else None
        engine = LLMEngine(config, tokenizer=tokenizer)
        sender.send(ReplicaReady(spec.name, engine.model_config, engine.num_blocks))
        _loop(spec, engine, conn, sender)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the core is gone
    except Exception:  # noqa: BLE001 (reported to the core, then the replica ends)
        error = f"{spec.name} failed:\n{traceback.format_exc()}"
        logger.error("%s", error)
        sender.send(Fatal(error))
    finally:
        sender.close()
        if engine is not None:
            engine.shutdown()


def _loop(spec: ReplicaSpec, engine, conn: Connection, sender: PipeSender) -> None:
    next_status = 0.0
    while True:
        if conn.poll(0.0 if engine.has_unfinished_requests() else IDLE_POLL_S):
            while conn.poll():
                message = conn.recv()
                if isinstance(message, Shutdown):
                    return
                _handle(spec, engine, message, sender)
        busy = engine.has_unfinished_requests()
        outputs = engine.step()
        # The load report rides along with outputs; steps that finish nothing (decodes of
        # non-streaming requests) report only every stats_interval_s, not once a step.
        if outputs or (busy and time.monotonic() >= next_status):
            sender.send(Outputs(outputs, _status(spec, engine)))
            next_status = time.monotonic() + spec.stats_interval_s
        if sender.error is not None:
            raise EOFError("the core closed the pipe") from sender.error


def _handle(spec: ReplicaSpec, engine, message: object, sender: PipeSender) -> None:
    if isinstance(message, Abort):
        engine.abort_request(message.request_id)
        return
    assert isinstance(message, AddRequest), message
    m = message
    try:
        engine.add_request(
            m.request_id, m.prompt_token_ids, m.sampling_params, prompt=m.prompt,
            arrival_time=m.arrival_time, stream=m.stream,
        )  # fmt: skip
    except ValueError as exc:  # the core ran the same checks: fail the request, not the replica
        sender.send(Outputs([error_output(m, str(exc))], _status(spec, engine)))


def _status(spec: ReplicaSpec, engine) -> InstanceStats:
    s = engine.stats().instances[0]
    return InstanceStats(spec.name, "colocated", s.num_running, s.num_waiting, s.kv_usage)


def _configure_process(spec: ReplicaSpec) -> None:
    """Makes the replica's GPU the current device, or pins it to its cores and sizes the
    thread pools to them (as the disaggregated instances do), so replicas do not compete."""
    import torch

    device = torch.device(spec.engine_config.device)
    if device.type == "cuda" and spec.engine_config.parallelism.world_size == 1:
        torch.cuda.set_device(device)  # TP x PP workers set their own (distributed.launch)
    if spec.cpu_cores is None:
        return
    from distserve_rt import ops

    os.sched_setaffinity(0, spec.cpu_cores)
    torch.set_num_threads(len(spec.cpu_cores))
    ops.set_num_threads(len(spec.cpu_cores))


def error_output(m: AddRequest, error: str, last: RequestOutput | None = None) -> RequestOutput:
    """The final output of a request that failed outside a step (finish_reason "error"),
    keeping the tokens `last` (its latest output) already carried."""
    now = time.monotonic()
    done = CompletionOutput(0, "", [], FinishReason.ERROR)
    if last is not None:
        prev = last.outputs[0]
        done = CompletionOutput(0, prev.text, list(prev.token_ids), FinishReason.ERROR)
    metrics = RequestMetrics.from_times(m.arrival_time, None, [], now)
    if last is not None:
        metrics = dataclasses.replace(last.metrics, finished_time=now)
        metrics.e2e_latency = now - m.arrival_time
    return RequestOutput(
        m.request_id, m.prompt, list(m.prompt_token_ids), [done], True, metrics, error
    )

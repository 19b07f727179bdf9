"""Start the ``tp * pp`` worker processes of one instance and talk to them.

Layout: global rank ``pp_rank * tp_size + tp_rank``; the TP group of a stage is its
``tp_size`` consecutive ranks; a rank's pipeline neighbours are the same TP rank of the
previous and next stage. Each process (multiprocessing *spawn*: CUDA and OpenMP do not
survive fork) runs `init_process_group` (gloo on CPU, NCCL on CUDA, rendezvous over TCP at
``tcp://<rendezvous host>:<free port>``, 127.0.0.1 on one machine), builds the TP groups,
then hands a `RankContext` to the target.

How ranks start is a seam (`RankStarter`): `SpawnRankStarter` spawns every rank here; the
Ray launcher's `distributed.ray_ranks.RayRankStarter` spawns the ranks of this node and
starts the others as Ray actors on theirs (an instance whose PP stages span nodes). Either
way a rank runs `_child_main` and the driver holds a `Connection` and a process-like object
(`RankProcess`) per rank.

The driver (the engine's process) holds one duplex `Connection` per rank. Workers answer
with ``("ok", payload)`` or ``("error", traceback)``; the driver always waits on every
worker's process sentinel too, so a worker that dies surfaces as `WorkerFailedError`, never
as a hang (its peers, blocked in a collective, are killed by `shutdown`).

CPU threads: each worker gets ``cores // world_size`` torch threads (at least 1). A world
larger than the cores is allowed with a warning (tests run TP=2 x PP=2 on 2 cores): it is
correct but slow. ``pin_cores`` gives each rank its own cores (``os.sched_setaffinity``).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import torch
import torch.distributed as dist

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.logger import init_logger

logger = init_logger(__name__)


class WorkerFailedError(RuntimeError):
    """A worker process raised or died; the instance is unusable (call `shutdown`)."""


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """How the worker processes of one instance are started."""

    tp_size: int = 1
    pp_size: int = 1
    device: str = "cpu"
    """"cpu", "cuda" or "cuda:<first index>": rank r uses device index first + r."""
    num_threads: int | None = None
    """CPU torch threads per worker; None = usable cores // world size (at least 1)."""
    pin_cores: bool = False
    """CPU: pin each rank to its own ``num_threads`` cores."""
    timeout_s: float = 300.0
    """Start-up limit, and the limit of a collective that waits for a peer."""

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ValueError(f"num_threads must be None or an int >= 1, got {self.num_threads!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def threads_per_worker(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        return max(1, len(os.sched_getaffinity(0)) // self.world_size)

    def device_of(self, rank: int) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        first = torch.device(self.device).index or 0
        return torch.device("cuda", first + rank)


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a worker process knows about its place in the instance."""

    rank: int
    world_size: int
    parallel: ParallelContext
    device: torch.device
    prev_rank: int | None
    """Global rank of the previous pipeline stage's same TP rank (None on the first stage)."""
    next_rank: int | None
    """Global rank of the next stage's same TP rank (None on the last stage)."""


# target(ctx, conn, *args): the worker's main loop; it answers on `conn` (see module).
WorkerTarget = Callable[..., None]


def check_world(launch: LaunchConfig) -> None:
    """Start-up checks that need no process: devices and cores for ``tp * pp`` ranks."""
    world = launch.world_size
    if launch.device.startswith("cuda"):
        first = torch.device(launch.device).index or 0
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if first + world > available:
            raise ValueError(
                f"tensor_parallel_size * pipeline_parallel_size = {world} ranks need CUDA "
                f"devices {first}..{first + world - 1}, but {available} are visible"
            )
        return
    cores = len(os.sched_getaffinity(0))
    if world > cores:
        logger.warning(
            "%d worker processes on %d CPU cores: oversubscribed (correct, but slow)", world, cores
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RankProcess(Protocol):
    """What the driver needs of a started rank (`multiprocessing.Process` has it all)."""

    pid: int | None
    exitcode: int | None

    @property
    def sentinel(self) -> int:
        """A descriptor that becomes readable when the rank ended (`connection.wait`)."""

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


class RankStarter(abc.ABC):
    """How the ranks of one `WorkerGroup` start: each runs `_child_main` with the group's
    ``init_method`` and answers on its end of a duplex `Connection`."""

    rendezvous_host = "127.0.0.1"
    """Where rank 0 listens for the torch.distributed rendezvous (rank 0 runs here)."""

    @abc.abstractmethod
    def start(
        self, launch: LaunchConfig, init_method: str, target: WorkerTarget, args: tuple
    ) -> list[tuple[Connection, RankProcess]]:
        """Starts every rank; (driver's connection, process) per rank, rank order. Raises
        when a rank cannot start (what it started is cleaned up by `close`)."""

    def close(self) -> None:  # noqa: B027 (optional: most starters hold nothing more)
        """Frees what `start` holds beyond the processes (after they were joined/killed)."""


class SpawnRankStarter(RankStarter):
    """Every rank a spawned child process of the driver, on this machine."""

    def start(
        self, launch: LaunchConfig, init_method: str, target: WorkerTarget, args: tuple
    ) -> list[tuple[Connection, RankProcess]]:
        return [
            spawn_rank(rank, launch, init_method, target, args) for rank in range(launch.world_size)
        ]


def spawn_rank(
    rank: int, launch: LaunchConfig, init_method: str, target: WorkerTarget, args: tuple
) -> tuple[Connection, RankProcess]:
    """One rank as a spawned daemon process (it never outlives the driver's process)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_child_main,
        args=(rank, launch, init_method, child, target, args),
        name=f"drt-worker-{rank}",
        daemon=True,
    )
    proc.start()
    child.close()
    return parent, proc


class WorkerGroup:
    """The driver's side of ``tp * pp`` worker processes (see the module docstring).

    Args:
        launch: sizes, device, threads.
        target: the worker main loop, a module-level function (spawn pickles it by name).
        args: extra picklable arguments of `target`.
        starter: how the ranks start (None: `SpawnRankStarter`, all on this machine).
    """

    def __init__(
        self,
        launch: LaunchConfig,
        target: WorkerTarget,
        args: tuple = (),
        starter: RankStarter | None = None,
    ) -> None:
        check_world(launch)
        self.launch = launch
        self.failed: str | None = None
        self._starter = starter or SpawnRankStarter()
        host = self._starter.rendezvous_host
        init_method = f"tcp://{host}:{free_port(host)}"
        # Answers read while waiting for another rank, per rank, oldest first.
        self._inboxes: list[collections.deque] = [
            collections.deque() for _ in range(launch.world_size)
        ]
        try:
            started = self._starter.start(launch, init_method, target, args)
        except BaseException:
            self._starter.close()
            raise
        self.conns: list[Connection] = [conn for conn, _ in started]
        self.processes: list[RankProcess] = [proc for _, proc in started]

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    def send(self, ranks: range | list[int], message: Any) -> None:
        """Sends ``message`` (pickled once) to each of ``ranks``."""
        self._check_alive()
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in ranks:
            self.conns[rank].send_bytes(payload)

    def recv(self, rank: int, timeout_s: float | None = None) -> Any:
        """The next answer of ``rank``; raises `WorkerFailedError` when any worker raises or
        dies first, TimeoutError after ``timeout_s`` seconds (None: no limit)."""
        self._check_alive()
        inbox = self._inboxes[rank]
        while not inbox:
            watched = [*self.conns, *(p.sentinel for p in self.processes)]
            ready = wait(watched, timeout_s)
            if not ready:
                raise TimeoutError(f"worker {rank} did not answer within {timeout_s} s")
            self._drain(ready)
        return inbox.popleft()

    def _drain(self, ready: list) -> None:
        """Reads every readable connection into its inbox; fails on an error answer or on a
        process that exited with nothing left to read."""
        for other, conn in enumerate(self.conns):
            if conn in ready:
                answer = self._read(other, conn)
                if isinstance(answer, str):
                    self._fail(other, answer)
                self._inboxes[other].append(answer[1])
        for other, proc in enumerate(self.processes):
            if proc.sentinel in ready and not self.conns[other].poll():
                proc.join(1.0)
                # A Ray rank knows why its actor ended (`ray_ranks.RayRank.death_reason`).
                why = getattr(proc, "death_reason", None)
                self._fail(other, why or f"exited (exit code {proc.exitcode})")

    def gather(self, timeout_s: float | None = None) -> list[Any]:
        """One answer from every rank, in rank order."""
        return [self.recv(rank, timeout_s) for rank in range(self.world_size)]

    def _read(self, rank: int, conn: Connection) -> tuple | str:
        """An ("ok", payload) answer, or the error text of a failed or closed worker."""
        try:
            answer = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return "closed its connection (the process died)"
        if answer[0] == "error":
            lines = answer[1].strip().splitlines()
            return f"raised {lines[-1] if lines else 'an error'}\nworker traceback:\n{answer[1]}"
        return answer

    def _fail(self, rank: int, why: str) -> None:
        summary, _, detail = why.partition("\n")
        self.failed = f"worker {rank} {summary}"
        raise WorkerFailedError(
            f"{self.failed}; the instance must be shut down" + (f"\n{detail}" if detail else "")
        )

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise WorkerFailedError(f"{self.failed}; the instance must be shut down")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Asks every worker to exit (None message), joins, kills what is left after
        ``timeout_s``. After a failure the survivors may be stuck in a collective: they
        are killed at once."""
        if self.failed is None:
            for conn in self.conns:
                with contextlib.suppress(BrokenPipeError, OSError):  # that worker is gone
                    conn.send_bytes(pickle.dumps(None))
            for proc in self.processes:
                proc.join(timeout_s)
        for proc in self.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout_s)
        for conn in self.conns:
            conn.close()
        self._starter.close()


def _child_main(
    rank: int,
    launch: LaunchConfig,
    init_method: str,
    conn: Connection,
    target: WorkerTarget,
    args: tuple,
) -> None:
    """Entry point of a worker process: bootstrap, run ``target``, report any error."""
    try:
        ctx = _bootstrap(rank, launch, init_method)
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise
    try:
        target(ctx, conn, *args)
    except BaseException:
        with contextlib.suppress(BrokenPipeError, OSError):  # the driver may be gone
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _bootstrap(rank: int, launch: LaunchConfig, init_method: str) -> RankContext:
    """Threads, device, process group and TP groups of this rank."""
    tp, pp = launch.tp_size, launch.pp_size
    device = launch.device_of(rank)
    if device.type == "cpu":
        threads = launch.threads_per_worker()
        torch.set_num_threads(threads)
        if launch.pin_cores:
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, cores[rank * threads : (rank + 1) * threads] or cores)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if device.type == "cpu" else "nccl",
        init_method=init_method,
        rank=rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=launch.timeout_s),
    )
    pp_rank, tp_rank = divmod(rank, tp)
    tp_group = None
    for stage in range(pp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
        if stage == pp_rank:
            tp_group = group
    parallel = ParallelContext(
        tp_size=tp,
        tp_rank=tp_rank,
        pp_size=pp,
        pp_rank=pp_rank,
        tp_group=tp_group if tp > 1 else None,
    )
    return RankContext(
        rank=rank,
        world_size=launch.world_size,
        parallel=parallel,
        device=device,
        prev_rank=rank - tp if pp_rank > 0 else None,
        next_rank=rank + tp if pp_rank < pp - 1 else None,
    )


def send_ok(conn: Connection, payload: Any = None) -> None:
    """A worker's answer to the driver (see the module docstring)."""
    conn.send_bytes(pickle.dumps(("ok", payload), protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn: Connection) -> Any:
    """A worker's next message from the driver; None means exit (EOF: the driver is gone)."""
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        return None

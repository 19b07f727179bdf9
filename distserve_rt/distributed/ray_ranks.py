"""Ranks of one instance on several Ray nodes: an instance whose PP stages span nodes.

The instance's driver (its Ray actor, on stage 0's node: rank 0 is there) spawns the ranks
of its own node as `launch.SpawnRankStarter` does, and starts every other rank as a
`RayRankActor` scheduled into that rank's bundle of the instance's placement group (bundle
index = rank; the launcher pinned each bundle to its stage's node). A Ray rank connects back
to the driver with `multiprocessing.connection.Client` over TCP (authenticated with a key
per instance), names its rank, and runs the same `_child_main` as a spawned one; the
torch.distributed rendezvous is at ``tcp://<rank-0 node ip>:<free port>`` (gloo on CPU).

Liveness, as `WorkerGroup` needs it: a Ray rank's `sentinel` becomes readable when its
actor's `run` ends (returned, raised, actor died, node lost: `ActorDiedError` within
seconds even when no FIN arrives), and a dead process closes its connection (EOF); either
surfaces as `WorkerFailedError`. `close` kills the rank actors; they are also owned by the
driver's actor (Ray kills them with it) and live in its placement group (removing the group
kills them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from distserve_rt.distributed import ray_cluster
from distserve_rt.distributed.connect_back import accept_named
from distserve_rt.distributed.launch import (
    LaunchConfig,
    RankProcess,
    RankStarter,
    WorkerTarget,
    _child_main,
    spawn_rank,
)
from distserve_rt.logger import init_logger

logger = init_logger(__name__)


@dataclass(frozen=True, slots=True)
class RankPlacement:
    """Where each rank of a spanning instance runs (the launcher's reservation)."""

    placement_group: Any
    """The instance's Ray placement group: one ``{"CPU": 1}`` bundle per rank, rank order."""
    node_ips: tuple[str, ...]
    """The node of each rank, rank order (each PP stage's ranks share one)."""


class RayRankActor:
    """One rank on another node than its driver (defined plainly; wrapped by `ray.remote`)."""

    def describe(self) -> tuple[int, str]:
        """(pid, node ip), asked before `run` (which lasts the actor's lifetime)."""
        return os.getpid(), ray_cluster.import_ray().util.get_node_ip_address()

    def run(
        self,
        rank: int,
        launch: LaunchConfig,
        init_method: str,
        address: tuple[str, int],
        authkey: bytes,
        target: WorkerTarget,
        args: tuple,
    ) -> None:
        conn = Client(address, authkey=authkey)
        conn.send(rank)  # which rank this connection belongs to
        _child_main(rank, launch, init_method, conn, target, args)


class RayRank:
    """The driver's view of one Ray rank, shaped like `multiprocessing.Process`."""

    def __init__(self, actor: Any, run_ref: Any, pid: int, node_ip: str) -> None:
        self.actor = actor
        self.pid: int | None = pid
        self.node_ip = node_ip
        self.exitcode: int | None = None
        self.death_reason: str | None = None
        """Why the actor ended, when it did not return (WorkerGroup's failure text)."""
        self._done = threading.Event()
        # Never closed: the watcher may write its byte at any time (a closed fd number
        # could be reused by then); one pipe per rank, for the driver's lifetime.
        self._read_fd, self._write_fd = os.pipe()
        threading.Thread(target=self._watch, args=(run_ref,), daemon=True).start()

    def _watch(self, run_ref: Any) -> None:
        ray = ray_cluster.import_ray()
        try:
            ray.get(run_ref)
            self.exitcode = 0
        except Exception as exc:  # noqa: BLE001 (any end of the actor is its end)
            first = (str(exc).strip().splitlines() or [""])[0]
            kind = type(exc).__name__
            self.death_reason = f"(Ray actor on {self.node_ip}) ended: {kind}: {first}"
            self.exitcode = 1
        self._done.set()
        os.write(self._write_fd, b"x")

    @property
    def sentinel(self) -> int:
        return self._read_fd

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def kill(self) -> None:
        ray_cluster.import_ray().kill(self.actor, no_restart=True)


class RayRankStarter(RankStarter):
    """Spawns the ranks on this node; starts the others as Ray actors in their bundles.

    Args:
        placement: each rank's node and the placement group holding its bundle.
        name: the instance's name (in errors and the rank actors' names).
    """

    def __init__(self, placement: RankPlacement, name: str) -> None:
        self.placement = placement
        self.name = name
        self.rendezvous_host = ray_cluster.driver_ip()
        if placement.node_ips[0] != self.rendezvous_host:
            raise RuntimeError(
                f"{name}: the driver runs on {self.rendezvous_host}, rank 0 is placed on "
                f"{placement.node_ips[0]} (the driver must run on stage 0's node)"
            )
        self.ray_ranks: list[RayRank] = []
        self._spawned: list[RankProcess] = []
        self._actors: list[Any] = []
        self.rank_node_ips: list[str] = []
        """Where each rank runs, rank order (a Ray rank's as its actor reported it)."""

    def start(
        self, launch: LaunchConfig, init_method: str, target: WorkerTarget, args: tuple
    ) -> list[tuple[Connection, RankProcess]]:
        ray = ray_cluster.import_ray()
        ips = self.placement.node_ips
        if len(ips) != launch.world_size:
            raise ValueError(f"{self.name}: {len(ips)} rank nodes for {launch.world_size} ranks")
        remote = [rank for rank, ip in enumerate(ips) if ip != self.rendezvous_host]
        authkey = secrets.token_bytes(16)
        listener = Listener((self.rendezvous_host, 0), authkey=authkey)
        try:
            actors = {rank: self._actor(rank) for rank in remote}
            self._actors = list(actors.values())  # killed by `close`, even before `run`
            described = ray.get([a.describe.remote() for a in actors.values()], timeout=60)
            for (rank, actor), (pid, node_ip) in zip(actors.items(), described, strict=True):
                run_ref = actor.run.remote(
                    rank, launch, init_method, listener.address, authkey, target, args
                )
                self.ray_ranks.append(RayRank(actor, run_ref, pid, node_ip))
            by_rank = dict(zip(remote, self.ray_ranks, strict=True))
            started: list[tuple[Connection, RankProcess] | None] = [None] * launch.world_size
            for rank in range(launch.world_size):
                if rank not in by_rank:
                    started[rank] = spawn_rank(rank, launch, init_method, target, args)
                    self._spawned.append(started[rank][1])  # type: ignore[index]
            for rank, conn in accept_named(
                listener, by_rank, lambda r: _ended(by_rank[r]), launch.timeout_s,
                f"{self.name}: rank",
            ).items():  # fmt: skip
                started[rank] = (conn, by_rank[rank])
        finally:
            listener.close()
        self.rank_node_ips = [
            by_rank[rank].node_ip if rank in by_rank else self.rendezvous_host
            for rank in range(launch.world_size)
        ]
        logger.info("%s: ranks on %s", self.name, self.rank_node_ips)
        return started  # type: ignore[return-value]

    def _actor(self, rank: int) -> Any:
        ray = ray_cluster.import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement.placement_group, placement_group_bundle_index=rank
        )
        # Named (unique suffix) so that tests and operators can find a rank's actor.
        name = f"drt-{self.name}-rank{rank}-{secrets.token_hex(4)}"
        options = dict(name=name, num_cpus=1, max_restarts=0, scheduling_strategy=strategy)
        return ray.remote(RayRankActor).options(**options).remote()

    def close(self) -> None:
        """Kills the Ray ranks, and the spawned ones a failed `start` left running."""
        for proc in self._spawned:
            if proc.is_alive():
                proc.kill()
        if not ray_cluster.import_ray().is_initialized():  # its actors died with Ray
            return
        for actor in self._actors:
            # Its node may be gone: then so is the actor.
            with contextlib.suppress(Exception):
                ray_cluster.import_ray().kill(actor, no_restart=True)


def _ended(rank: RayRank) -> str | None:
    """Why a Ray rank ended before connecting back (None while it runs)."""
    return None if rank.is_alive() else rank.death_reason or "returned"

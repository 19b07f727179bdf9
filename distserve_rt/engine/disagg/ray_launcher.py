"""``launcher="ray"``: each instance is a Ray actor on a cluster node, placed by a
placement group (`distributed.ray_worker_group`) that reserves one CPU per rank.

The controller's message protocol is unchanged: the actor connects back to the controller
with `multiprocessing.connection.Client` over TCP (authenticated with a per-controller
key), and that `Connection` is what a process instance's pipe is. The actor runs the same
`run_instance`. A TP x PP instance that fits one node starts its rank processes there
(STRICT_PACK). One that does not, or whose ``instance_nodes`` entry lists a node per stage,
spans nodes by PP stage (`assign_nodes`, `_place`): its actor runs on stage 0's node,
spawns the ranks there and starts the other stages' ranks as Ray actors in their bundles
(`distributed.ray_ranks`); torch.distributed rendezvous at ``tcp://<rank-0 node ip>:port``.

Liveness: a dead actor or a lost node shows as `ActorDiedError` / `ActorUnavailableError`
on the actor's `run` call (a lost node in ~2 s), or as the connection closing, whichever
comes first; either feeds the controller's existing death rules (`recovery`), through the
handle's ``sentinel`` and ``death_reason``. A spanning instance's rank on another node that
dies fails the instance's executor (`WorkerFailedError`), so the instance dies by the same
rules.

KV transport per (prefill rank, decode rank) pair (`ray_placement.rank_transports`,
`transfer.per_pair.RankDescriptors`): shm when both ranks are on one node, nixl otherwise,
between ranks whose layers overlap; an instance whose rank pairs need both exports and
reads through ``shm+nixl``. DistServe's "aligned" placement (each node holding the same
layers of a prefill and a decode instance, as `drt-run plan` writes Algorithm-2 pairs)
so moves all its KV over shm even though both instances span nodes.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from multiprocessing.connection import Client, Connection, Listener

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.distributed import ray_cluster
from distserve_rt.distributed.connect_back import accept_named
from distserve_rt.distributed.ray_ranks import RankPlacement
from distserve_rt.distributed.ray_worker_group import RayWorkerGroup
from distserve_rt.engine.disagg.child import describe_reply
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.instance import InstanceRole, InstanceSpec, run_instance
from distserve_rt.engine.disagg.launcher import instance_specs
from distserve_rt.engine.disagg.messages import InstanceStatus
from distserve_rt.engine.disagg.pipe_sender import PipeSender
from distserve_rt.engine.disagg.ray_placement import (
    InstanceLayout,
    RankTransports,
    StageNodes,
    assign_nodes,
    instance_transports,
    rank_transports,
    stage_nodes,
)
from distserve_rt.logger import init_logger
from distserve_rt.transfer.per_pair import RankDescriptors, select_rank_descriptors
from distserve_rt.worker.multiproc_executor import load_model_config

logger = init_logger(__name__)

CONNECT_TIMEOUT_S = 60.0
"""Seconds for every placed actor to start and connect back (after its placement)."""


class InstanceActor:
    """The Ray actor one instance runs in (defined plainly; `RayWorkerGroup` wraps it)."""

    def node_ip(self) -> str:
        return ray_cluster.import_ray().util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: InstanceSpec, address: tuple[str, int], authkey: bytes) -> None:
        conn = Client(address, authkey=authkey)
        conn.send(spec.name)  # which instance this connection belongs to
        run_instance(spec, conn)


class RayInstanceHandle:
    """The controller's end of one Ray instance: the same surface as `InstanceHandle`."""

    def __init__(
        self,
        spec: InstanceSpec,
        group: RayWorkerGroup,
        nodes: int | StageNodes,
        run_ref: object,
        pid: int,
    ) -> None:
        self.spec = spec
        self.group = group
        self.stage_nodes = stage_nodes(nodes)
        """Index of each PP stage's node in the cluster order (one: on one node)."""
        self.node = self.stage_nodes[0]
        """Its actor's (stage 0's) node."""
        self.node_ip = group.node_ips[0]
        self.run_ref = run_ref
        self.conn: Connection | None = None
        self._sender: PipeSender | None = None
        self.alive = True
        self.status: InstanceStatus | None = None
        self.num_queued_tokens = 0
        self.num_assigned = 0
        self.rank_transports: dict[int, RankTransports] = {}
        """Decode instances: prefill index -> the transport of each (this instance's rank,
        that instance's rank) pair (`ray_placement.rank_transports`)."""
        self.death_reason: str | None = None
        self._read_fd, self._write_fd = os.pipe()
        self._pid = pid
        self._stopped = False
        threading.Thread(target=self._watch, name=f"watch-{spec.name}", daemon=True).start()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> InstanceRole:
        return self.spec.role

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def sentinel(self) -> int:
        """Readable once the actor ended (its `run` returned, raised, or the actor died)."""
        return self._read_fd

    def _watch(self) -> None:
        ray = ray_cluster.import_ray()
        try:
            ray.get(self.run_ref)
            reason = "its Ray actor returned"
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
            reason = f"its Ray actor died ({type(exc).__name__}: {_first_line(exc)})"
        except Exception as exc:  # noqa: BLE001 (any end of the actor is its death)
            reason = f"its Ray actor failed ({type(exc).__name__}: {_first_line(exc)})"
        self.death_reason = reason
        os.write(self._write_fd, b"x")

    def attach(self, conn: Connection) -> None:
        self.conn = conn
        self._sender = PipeSender(conn, f"controller-{self.name}")

    def is_running(self) -> bool:
        return self.death_reason is None

    def recv(self) -> object:
        try:
            return self.conn.recv()  # type: ignore[union-attr]
        except (EOFError, OSError) as exc:
            return exc

    def describe_start_failure(self, reply: object) -> str:
        if isinstance(reply, (EOFError, OSError)):
            deadline = time.monotonic() + 5.0
            while self.death_reason is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the actor's end comes with the connection's
            return self.death_reason or describe_reply(reply)
        return describe_reply(reply)

    def send(self, message: object) -> bool:
        return self.alive and self._sender is not None and self._sender.send(message)

    def select_peer_descriptors(
        self, descriptors: dict[int, list[bytes]]
    ) -> dict[int, RankDescriptors]:
        """Per prefill instance, each of this instance's ranks gets the descriptor of the
        transport chosen for each of its rank pairs (none for a pair that moves no KV)."""
        return {
            index: select_rank_descriptors(raws, self.rank_transports[index])
            for index, raws in descriptors.items()
        }

    def stop(self, timeout_s: float) -> None:
        """Waits for the actor to return (after Shutdown), then kills it and frees its
        placement group."""
        ray = ray_cluster.import_ray()
        self.alive = False
        if self._stopped:  # death rules stop it once, shutdown again
            return
        self._stopped = True
        if self._sender is not None:
            self._sender.close(timeout_s)
        # Ray already shut down (interpreter exit): its actors died with this driver.
        if ray.is_initialized():
            if self.death_reason is None:
                ray.wait([self.run_ref], timeout=timeout_s)
            self.group.shutdown()
        if self.conn is not None:
            self.conn.close()
        # The sentinel's pipe stays open: the watcher thread may still write its one byte.


def launch_ray_instances(
    config: EngineConfig,
    placement: Placement,
    dc: DisaggConfig,
    fault_plan: FaultPlan | None = None,
) -> list[RayInstanceHandle]:
    """Places and starts every instance of `placement` on the Ray cluster; returns their
    handles once each actor connected back (its model then loads: the controller waits for
    Ready as for processes). Raises (one line) what the cluster or config cannot run."""
    check_ray_config(config, dc, fault_plan)
    ray = ray_cluster.import_ray()
    ray_cluster.connect(dc.ray_address)
    cluster = ray_cluster.nodes()
    specs = instance_specs(config, placement, dc, "shm")
    shapes = [(s.engine_config.tensor_parallel_size, s.num_ranks) for s in specs]
    shapes = [(tp, num_ranks // tp) for tp, num_ranks in shapes]
    nodes = assign_nodes(shapes, cluster, dc.instance_nodes)
    roles = [s.role for s in specs]
    layouts = [InstanceLayout(tp, n) for (tp, _), n in zip(shapes, nodes, strict=True)]
    num_layers = load_model_config(config.model).num_layers
    names = instance_transports(roles, layouts, num_layers, dc.transport)
    auto = instance_transports(roles, layouts, num_layers, "auto")
    if dc.transport == "shm" and "nixl" in "".join(auto):
        raise ValueError(
            "transport='shm' cannot reach across nodes (a prefill rank and a decode rank "
            "that move KV are on different nodes); use 'auto' or 'nixl'"
        )
    specs = [
        dataclasses.replace(s, transport=t, cpu_cores=None)
        for s, t in zip(specs, names, strict=True)
    ]
    authkey = secrets.token_bytes(16)
    listener = Listener(("0.0.0.0", 0), authkey=authkey)
    address = (ray_cluster.driver_ip(), listener.address[1])
    handles: list[RayInstanceHandle] = []
    try:
        for spec, stages in zip(specs, nodes, strict=True):
            group, spec = _place(spec, [cluster[n].ip for n in stages], dc)
            actor = group.actors[0]
            # Before `run`: an actor runs its calls in order, and `run` lasts its lifetime.
            pid = ray.get(actor.pid.remote(), timeout=CONNECT_TIMEOUT_S)
            run_ref = actor.run.remote(spec, address, authkey)
            handles.append(RayInstanceHandle(spec, group, stages, run_ref, pid))
        _choose_rank_transports(handles, layouts, num_layers, dc.transport)
        _accept_all(listener, handles)
    except BaseException:
        for h in handles:
            h.stop(1.0)
        raise
    finally:
        listener.close()
    logger.info(
        "ray: %s",
        ", ".join(f"{h.name} on {h.node_ip} ({h.spec.transport})" for h in handles),
    )
    return handles


def _choose_rank_transports(
    handles: list[RayInstanceHandle], layouts: list[InstanceLayout], num_layers: int, transport: str
) -> None:
    """Each decode handle's `rank_transports` with every prefill instance (logged, one
    line a decode instance: how many of its rank pairs with each prefill use which)."""
    prefills = [
        (h, lay) for h, lay in zip(handles, layouts, strict=True) if h.role is InstanceRole.PREFILL
    ]
    for h, layout in zip(handles, layouts, strict=True):
        if h.role is not InstanceRole.DECODE:
            continue
        told = []
        for p, p_layout in prefills:
            chosen = rank_transports(p_layout, layout, num_layers, transport)
            h.rank_transports[p.spec.index] = chosen
            used = [t for row in chosen for t in row if t is not None]
            counts = ", ".join(f"{used.count(t)} {t}" for t in sorted(set(used)))
            told.append(f"{p.name}: {counts}")
        logger.info("%s rank pairs: %s", h.name, "; ".join(told))


def _place(
    spec: InstanceSpec, stage_ips: list[str], dc: DisaggConfig
) -> tuple[RayWorkerGroup, InstanceSpec]:
    """Reserves one CPU per rank and starts the instance's actor on stage 0's node.

    On one node: STRICT_PACK with bundle 0 pinned (the actor spawns every rank there).
    Spanning nodes: one group whose bundles (bundle index = rank) are each pinned to their
    stage's node, strategy PACK (it allows several nodes; the pins decide which). One group
    per instance, not per stage: Ray reserves a group all at once, so an instance never
    holds some stages while it waits for the others (two instances could deadlock so).
    The spec then carries each rank's node and the group (`ray_ranks.RankPlacement`): the
    actor starts the other nodes' ranks as Ray actors in their bundles."""
    tp = spec.engine_config.tensor_parallel_size
    rank_ips = [stage_ips[rank // tp] for rank in range(spec.num_ranks)]
    bundles = [{"CPU": 1}] * spec.num_ranks
    if len(set(stage_ips)) == 1:
        pinned = [rank_ips[0]] + [None] * (spec.num_ranks - 1)
        strategy = "STRICT_PACK"
    else:
        pinned, strategy = list(rank_ips), "PACK"
    group = RayWorkerGroup(
        spec.name, bundles, pinned, strategy=strategy, timeout_s=dc.placement_timeout_s,
        actor_cls=InstanceActor, num_actors=1,
    )  # fmt: skip
    if strategy == "PACK":
        placement = RankPlacement(group.pg, tuple(rank_ips))
        spec = dataclasses.replace(spec, rank_placement=placement)
    return group, spec


def check_ray_config(config: EngineConfig, dc: DisaggConfig, fault_plan: FaultPlan | None) -> None:
    if config.device != "cpu":
        raise NotImplementedError(
            f"launcher='ray' with device={config.device!r}: GPU instances on Ray (a GPU per "
            "bundle, NCCL groups, nixl VRAM registration) are not built or tested (no GPU "
            "here); use device='cpu', or launcher='process' on one GPU node"
        )
    if fault_plan is not None:
        raise ValueError("a fault plan needs launcher='thread'; launcher='ray' runs none")
    if dc.transport not in ("auto", "shm", "nixl"):
        raise ValueError(
            f"launcher='ray' moves KV through 'shm' or 'nixl' (transport='auto' picks per "
            f"pair), got transport={dc.transport!r}"
        )


def _accept_all(listener: Listener, handles: list[RayInstanceHandle]) -> None:
    """Attaches each actor's connection (it names its instance first), within
    CONNECT_TIMEOUT_S; an actor that failed before connecting is reported at once."""
    by_name = {h.name: h for h in handles}
    conns = accept_named(
        listener, by_name, lambda name: by_name[name].death_reason, CONNECT_TIMEOUT_S, "instance"
    )
    for name, conn in conns.items():
        by_name[name].attach(conn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""

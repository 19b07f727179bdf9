"""A group of Ray actors in one placement group: what the `ray` launcher starts an instance
with, and what a TP x PP group spanning nodes is wired on.

One placement group per group of ranks. Each bundle is ``resources`` plus, when the caller
names a node for it, a sliver of that node's ``node:<ip>`` resource (`ray_cluster`), so the
bundle lands there. An instance is STRICT_PACK over its tp*pp bundles with bundle 0 pinned
(every rank on one node), or, spanning nodes, PACK with every bundle pinned to its PP
stage's node (`engine.disagg.ray_launcher._place`; its ranks: `ray_ranks`). `pg.ready()`
is always awaited with a timeout: an infeasible group never errors in Ray, it waits
forever; here it fails in one line naming what is missing.

Ranks are ordered by node (the nodes' order in `ray_cluster.nodes`, then bundle index), so
consecutive ranks (a TP group) share a node whenever the bundles allow it.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Callable, Sequence
from typing import Any

from distserve_rt.distributed import ray_cluster
from distserve_rt.logger import init_logger

logger = init_logger(__name__)

NODE_SLIVER = 0.001
"""How much of a ``node:<ip>`` resource one bundle asks for (the node has 1.0)."""


class PlacementError(RuntimeError):
    """The cluster cannot hold a placement group (its message names what is missing)."""


def check_feasible(
    name: str, bundles: Sequence[dict[str, float]], node_ips: Sequence[str | None], strategy: str
) -> None:
    """Refuses at once, in one line, what no wait would make fit: a node that is not in the
    cluster, or more of a resource on one node than that node has in all."""
    live = {n.ip: n for n in ray_cluster.nodes()}
    have = ", ".join(n.describe() for n in live.values()) or "no live node"
    for ip in node_ips:
        if ip is not None and ip not in live:
            raise PlacementError(f"{name}: node {ip} is not in the cluster (it has {have})")
    if strategy != "STRICT_PACK":
        return
    pinned = next((ip for ip in node_ips if ip is not None), None)
    candidates = [live[pinned]] if pinned else list(live.values())
    for key, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(b.get(key, 0) for b in bundles)
        if need and not any(getattr(n, attr) >= need for n in candidates):
            where = f"node {pinned}" if pinned else "any node"
            raise PlacementError(
                f"{name}: needs {need:g} {key}s on one node (STRICT_PACK of {len(bundles)} "
                f"ranks), {where} has fewer (cluster: {have})"
            )


class RankActor:
    """One rank: reports where it runs, joins a torch.distributed group, runs functions."""

    def node_ip(self) -> str:
        return ray_cluster.import_ray().util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_process_group(
        self, init_method: str, rank: int, world_size: int, timeout_s: float
    ) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class RayWorkerGroup:
    """`len(bundles)` actors of `actor_cls` in one placement group, in rank order.

    Args:
        name: what errors call the group (an instance's name).
        bundles: each rank's resources, e.g. ``{"CPU": 1}``.
        node_ips: per bundle, the node it must land on (None: anywhere the strategy allows).
        strategy: Ray's placement strategy (STRICT_PACK: one node).
        timeout_s: the wait for the cluster to reserve the bundles.
        num_actors: actors on the first bundles (None: one per bundle). An instance has
            one (bundle 0): it starts its tp*pp ranks itself, in the bundles its group
            reserved for them (spawned on its node, Ray actors on the others').
    """

    def __init__(
        self,
        name: str,
        bundles: Sequence[dict[str, float]],
        node_ips: Sequence[str | None],
        strategy: str = "STRICT_PACK",
        timeout_s: float = 60.0,
        actor_cls: type = RankActor,
        actor_args: tuple = (),
        num_actors: int | None = None,
    ) -> None:
        ray = ray_cluster.import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if len(bundles) != len(node_ips):
            raise ValueError(f"{len(bundles)} bundles but {len(node_ips)} node_ips")
        check_feasible(name, bundles, node_ips, strategy)
        self.name = name
        pinned = []
        for bundle, ip in zip(bundles, node_ips, strict=True):
            b = dict(bundle)
            if ip is not None:
                b[ray_cluster.node_resource(ip)] = NODE_SLIVER
            pinned.append(b)
        self.pg = placement_group(pinned, strategy=strategy, name=f"drt-{name}")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            free = ray.available_resources()
            raise PlacementError(
                f"{name}: the cluster could not reserve {pinned} ({strategy}) within "
                f"placement_timeout_s={timeout_s:g}; free now: "
                f"{ {k: v for k, v in free.items() if k in ('CPU', 'GPU')} }"
            ) from None
        remote_cls = ray.remote(actor_cls)
        actors = [
            remote_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                ),
            ).remote(*actor_args)
            for i, bundle in enumerate(bundles[: num_actors or len(bundles)])
        ]
        ips = ray.get([a.node_ip.remote() for a in actors], timeout=timeout_s)
        order = {n.ip: k for k, n in enumerate(ray_cluster.nodes())}
        ranked = sorted(range(len(actors)), key=lambda i: (order.get(ips[i], len(order)), i))
        self.actors = [actors[i] for i in ranked]
        self.node_ips = [ips[i] for i in ranked]
        """The node of each rank, rank order."""

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def init_torch_distributed(self, timeout_s: float = 60.0) -> str:
        """A gloo group over the ranks, rendezvous at ``tcp://<rank-0 node ip>:<port>``
        (a free port on rank 0's node); returns that init method."""
        ray = ray_cluster.import_ray()
        port = ray.get(self.actors[0].free_port.remote(), timeout=timeout_s)
        init_method = f"tcp://{self.node_ips[0]}:{port}"
        refs = [
            a.init_process_group.remote(init_method, rank, self.world_size, timeout_s)
            for rank, a in enumerate(self.actors)
        ]
        ray.get(refs, timeout=timeout_s)
        return init_method

    def run_all(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> list:
        """``fn(rank, *args)`` on every rank; their results, rank order."""
        ray = ray_cluster.import_ray()
        refs = [a.run.remote(fn, rank, *args) for rank, a in enumerate(self.actors)]
        return ray.get(refs, timeout=timeout_s)

    def shutdown(self) -> None:
        ray = ray_cluster.import_ray()
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        # Its node may be gone: nothing left to free then.
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)

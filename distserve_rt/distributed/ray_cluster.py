"""The Ray cluster the `ray` launcher places instances on: connecting, its live nodes, and
the per-node resource (``node:<ip>``) that pins a placement-group bundle to one node.

Ray is imported here and in the modules that launch on Ray only: the process launcher and
every test that does not ask for a cluster run without it (``requirements/cluster.txt``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from distserve_rt.logger import init_logger

logger = init_logger(__name__)


def import_ray():
    """`ray`, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "launcher='ray' needs Ray: pip install -r requirements/cluster.txt (ray==2.60.0)"
        ) from exc
    return ray


def node_resource(ip: str) -> str:
    """The resource Ray gives every node (amount 1): asking for a sliver of it pins a
    bundle to that node. STRICT_SPREAD bundle order does not follow node order, so this is
    how a bundle lands on the node the placement names (vLLM does the same)."""
    return f"node:{ip}"


@dataclass(frozen=True, slots=True)
class ClusterNode:
    ip: str
    node_id: str
    num_cpus: float
    num_gpus: float
    is_head: bool

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPUs" if self.num_gpus else ""
        return f"{self.ip} ({self.num_cpus:g} CPUs{gpus})"


def connect(address: str | None) -> None:
    """Joins the cluster at `address` (``host:port`` of the head's GCS, or "auto"); does
    nothing when this process is connected already. One-line ConnectionError otherwise."""
    ray = import_ray()
    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        check_reachable(address)
    try:
        ray.init(address=address or "auto", log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(
            f"ray_address={address!r}: cannot join a Ray cluster there ({first}); start one "
            "with `ray start --head` and pass its address (host:port)"
        ) from None


PROBE_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connect to the head's GCS first: `ray.init` at an address where nothing listens
    retries for minutes (measured: over 2 minutes) before it gives up."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"ray_address={address!r}: expected HOST:PORT of the Ray head's GCS")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(
            f"ray_address={address!r}: nothing answers there ({exc.strerror or exc}); start "
            "the head with `ray start --head --port PORT` and pass HOST:PORT"
        ) from None


def nodes() -> list[ClusterNode]:
    """The live nodes, head first, then by IP (the order placement files' node indices
    refer to)."""
    ray = import_ray()
    found = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        found.append(
            ClusterNode(
                ip=n["NodeManagerAddress"],
                node_id=n["NodeID"],
                num_cpus=float(res.get("CPU", 0)),
                num_gpus=float(res.get("GPU", 0)),
                is_head="node:__internal_head__" in res,
            )
        )
    return sorted(found, key=lambda node: (not node.is_head, _ip_key(node.ip)))


def driver_ip() -> str:
    """The address of this process's node as the cluster knows it (Ray may rewrite a
    loopback address to the host's routable one: ask Ray, do not guess)."""
    ray = import_ray()
    return ray.util.get_node_ip_address()


def _ip_key(ip: str) -> tuple:
    parts = ip.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (ip,)

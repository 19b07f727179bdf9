"""A producer (prefill-side) process for the transfer tests: it owns shared pools filled
with seeded random data and obeys commands sent over a Pipe, so that tests pull from a
real second process. The parent rebuilds the same data from the seed (`random_pool`) as the
reference."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import asdict

import torch

from distserve_rt.core.kv_cache import KVCacheSpec

INT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def random_pool(spec: KVCacheSpec, seed: int) -> torch.Tensor:
    """Seeded random pool of `spec` (normal values, cast: every bit pattern class shows up)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(spec.shape, generator=gen).to(spec.dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparisons (NaN-safe, -0.0 != 0.0)."""
    return tensor.view(INT_VIEWS[tensor.dtype])


@contextlib.contextmanager
def ucx_over_tcp() -> Iterator[None]:
    """UCX_TLS=tcp for this process and the peers it spawns meanwhile: on one host UCX
    would otherwise pick cma (a process_vm_readv shortcut), not the network path."""
    old = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = "tcp"
    try:
        yield
    finally:
        if old is None:
            del os.environ["UCX_TLS"]
        else:
            os.environ["UCX_TLS"] = old


def serve(conn, transport_name: str, transport_kwargs: dict) -> None:
    """Child main loop. Commands: ("alloc", spec dict, seed) -> descriptor bytes;
    ("mark_ready", index) -> None; ("close_pool", index) -> None; ("exit",) -> closes the
    transport and returns (a clean exit)."""
    from distserve_rt.transfer import create_transport

    if transport_name == "cuda_ipc":
        torch.cuda.init()
    transport = create_transport(transport_name, **transport_kwargs)
    pools: list[torch.Tensor] = []
    conn.send(("ready", os.getpid()))
    while True:
        command, *args = conn.recv()
        if command == "alloc":
            spec = KVCacheSpec(**args[0])
            pool = transport.allocate_pool(spec)
            pool.copy_(random_pool(spec, args[1]).to(pool.device))
            pools.append(pool)
            desc = transport.register_pool(pool)
            transport.mark_ready(pool)
            conn.send(desc.to_bytes())
        elif command == "close_pool":
            if transport_name not in ("shm", "nixl"):
                raise NotImplementedError(
                    f"close_pool is only wired for shm and nixl, not {transport_name}"
                )
            transport.unregister_pool(pools[args[0]])
            conn.send(None)
        elif command == "exit":
            transport.close()
            conn.send(None)
            return
        else:
            raise ValueError(f"unknown command {command!r}")


class PeerProcess:
    """Parent-side handle of a `serve` child (spawn: a fresh interpreter, as in production)."""

    def __init__(self, transport_name: str = "shm", **transport_kwargs: object) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=serve, args=(child_conn, transport_name, transport_kwargs), daemon=True
        )
        self.process.start()
        if not self.conn.poll(60):
            raise TimeoutError("the peer process did not start within 60 s")
        _, self.pid = self.conn.recv()

    def call(self, *command: object, timeout_s: float = 30.0) -> object:
        self.conn.send(command)
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the peer process did not answer {command[0]!r}")
        return self.conn.recv()

    def alloc(self, spec: KVCacheSpec, seed: int) -> bytes:
        return self.call("alloc", asdict(spec), seed)

    def exit(self) -> None:
        if self.process.is_alive():
            self.call("exit")
        self.process.join(30)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(30)

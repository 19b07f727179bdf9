"""The `nixl` transport: KV pulled across machines with NIXL's one-sided READ (UCX backend).

Mapping onto `KVTransport` (the way vLLM's NixlConnector pulls):

- ``register_pool`` = ``register_memory`` of the pool + the agent's metadata, sent to peers
  inside the `PoolDescriptor` (``handle`` = pool address and base64 metadata);
- ``open_peer`` = ``add_remote_agent`` (cached); the remote descriptor lists are prepared
  (``prep_xfer_dlist``) once per peer and run kind (`nixl_layout`);
- ``submit`` = ``make_prepped_xfer("READ")`` + ``transfer``; ``poll`` = ``check_xfer_state``.

What NIXL does not give and this backend adds:

- A deadline per transfer, on an injectable clock: a frozen peer (SIGSTOP, a hung node)
  leaves a READ in PROC forever (with ``UCX_TLS=tcp``, over 75 s measured), so a transfer
  not DONE ``deadline_s`` after submit becomes FAILED with a message.
- Late completions cannot write into the caller's blocks. NIXL cannot cancel an in-flight
  READ, and a FAILED transfer hands its destination blocks back to the caller, who frees and
  reuses them. So every READ lands in a staging buffer owned by this transport and is
  copied into the destination pool only once it is DONE; a READ given up on keeps its
  staging range taken (quarantined) until NIXL reports it ended. The other choice, keeping
  the destination blocks quarantined, would need every caller to hold blocks past a final
  status; staging keeps the contract of `KVTransport` as it is, at the cost of one local
  copy (cheaper than the network by several times, see docs/kv_transfer.md).
- ``UCX_TCP_TX_SEG_SIZE=64K`` unless the environment sets it: UCX's 8K default segments
  held loopback TCP pulls at ~0.5 GB/s.

Host (DRAM) pools only: VRAM registration (GPUDirect RDMA) is the same NIXL call, but there
was no GPU to test it, so GPU pools raise NotImplementedError. Not thread-safe: one thread
drives a transport (as the engine does). No fallback: if NIXL or UCX cannot move the bytes,
the transfer fails and says so.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.logger import init_logger
from distserve_rt.transfer import nixl_layout
from distserve_rt.transfer.base import (
    KVTransport,
    PeerUnavailableError,
    TransferHandle,
    TransferResult,
    TransferStats,
    TransferStatus,
)
from distserve_rt.transfer.descriptor import (
    KVSlice,
    PoolDescriptor,
    SubmitPlan,
    check_pool,
    describe_pool,
    plan_submit,
)
from distserve_rt.transfer.nixl_staging import StagingRanges

logger = init_logger(__name__)

DEFAULT_DEADLINE_S = 20.0
"""Below the decode puller's 60 s timeout, so a frozen peer shows as a FAILED transfer with
the transport's reason rather than as the puller's generic timeout."""
DEFAULT_STAGING_BYTES = 256 << 20
UCX_ENV_DEFAULTS = {"UCX_TCP_TX_SEG_SIZE": "64K", "NIXL_LOG_LEVEL": "WARN"}
"""Set before NIXL loads and the agent exists (both read their environment then), never
over a user's value. NIXL logs every agent's creation at INFO otherwise."""


def _import_nixl():
    try:
        import nixl_cu12
    except ImportError as exc:
        raise RuntimeError(
            "the nixl transport needs the NIXL wheel: pip install nixl-cu12==1.5.1 in the same "
            f"pip command as the torch pin (see requirements/cluster.txt); import failed: {exc}"
        ) from None
    return nixl_cu12


@contextlib.contextmanager
def _progress_delay(nixl: object, delay_us: int) -> Iterator[None]:
    """While NIXL's Python agent is built, its config's ``pthrDelay`` (which it sets to 0)
    takes `delay_us`: the wrapper has no parameter for it (nixl-cu12 1.5.1)."""
    api = nixl._api  # type: ignore[attr-defined]
    base = api.nixlBind.nixlAgentConfig
    get = base.pthrDelay.fget
    put = base.pthrDelay.fset

    class _Config(base):  # type: ignore[misc, valid-type]
        pthrDelay = property(get, lambda self, _value: put(self, delay_us))  # noqa: N815

    api.nixlBind.nixlAgentConfig = _Config
    try:
        yield
    finally:
        api.nixlBind.nixlAgentConfig = base


@dataclass(frozen=True, slots=True)
class NixlPeer:
    """A peer pool known to this agent (what `submit` takes)."""

    descriptor: PoolDescriptor
    agent_name: str
    base_addr: int


@dataclass(eq=False, slots=True)
class _Transfer:
    """One transfer: queued (no READ yet), in flight, or given up on while in flight."""

    peer: NixlPeer
    dst_pool: torch.Tensor
    plan: SubmitPlan
    layout: nixl_layout.RunLayout
    submit_time: float
    num_staging_bytes: int
    staging_offset: int = -1
    xfer: object = None
    local_dlist: object = None
    copy_out: Future | None = None
    """Set once the READ is DONE: the copy from staging into dst_pool."""
    result: TransferResult | None = None


def encode_handle(base_addr: int, metadata: bytes) -> str:
    return f"{base_addr:x}:{base64.b64encode(metadata).decode()}"


def decode_handle(handle: str) -> tuple[int, bytes]:
    addr, _, metadata = handle.partition(":")
    try:
        return int(addr, 16), base64.b64decode(metadata, validate=True)
    except ValueError:
        raise ValueError(f"not a nixl pool handle: {handle[:40]!r}...") from None


class NixlTransport(KVTransport):
    """KV transfer between processes on any machines reachable by UCX, through NIXL.

    Args:
        deadline_s: seconds after submit by which a transfer must be DONE; then it is
            FAILED (NIXL alone would wait forever on a frozen peer).
        staging_bytes: size of the staging buffer every READ lands in (see the module
            doc); a transfer larger than it is refused, one that finds it full waits
            PENDING (its deadline running).
        clock: monotonic seconds, for the deadlines (tests drive it by hand).
        agent_name: NIXL agent name, unique among the peers (default: host, pid, random).
        progress_delay_us: pause of NIXL's progress thread between polls of UCX. NIXL's
            Python agent fixes it at 0, a busy loop that took half a core per idle process
            here (2 shared cores, every instance rank has one); 100 us costs ~1.5% of a
            core. 0 restores NIXL's busy loop (lowest latency on dedicated cores).
    """

    name = "nixl"

    def __init__(
        self,
        deadline_s: float = DEFAULT_DEADLINE_S,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        clock: Callable[[], float] = time.monotonic,
        agent_name: str | None = None,
        progress_delay_us: int = 100,
    ) -> None:
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float):
            raise ValueError(f"deadline_s must be a number of seconds > 0, got {deadline_s!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s!r}")
        if not isinstance(progress_delay_us, int) or not 0 <= progress_delay_us <= 1_000_000:
            raise ValueError(
                f"progress_delay_us must be an int in [0, 1e6], got {progress_delay_us!r}"
            )
        self._ranges = StagingRanges(staging_bytes)  # checks staging_bytes
        for key, value in UCX_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        nixl = _import_nixl()
        self.deadline_s = float(deadline_s)
        self._clock = clock
        name = agent_name or f"drt-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with _progress_delay(nixl, progress_delay_us):
                self._agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"]))
        except Exception as exc:  # nixlBind's error types
            raise RuntimeError(
                f"NIXL could not start its UCX backend ({exc}); UCX printed why above, often "
                "a UCX_* environment variable (UCX_TLS, UCX_TCP_TX_SEG_SIZE) it refuses"
            ) from None
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL has no UCX backend plugin here; the nixl transport needs it")
        self.agent_name = name
        self._registered: dict[int, tuple[torch.Tensor, object]] = {}  # data_ptr -> (pool, reg)
        self._peers: dict[tuple, NixlPeer] = {}
        self._remote_dlists: dict[tuple, object] = {}  # (agent, addr, layout kind) -> prepped
        self._staging: torch.Tensor | None = None  # uint8 [staging_bytes], registered lazily
        self._staging_reg: object = None
        self._transfers: dict[int, _Transfer] = {}  # queued and in flight, by id
        self._queued: list[int] = []  # waiting for staging room, in submit order
        self._quarantined: list[_Transfer] = []  # FAILED by deadline, READ still in flight
        self._ids = itertools.count(1)
        self._stats = TransferStats()
        self._copier: ThreadPoolExecutor | None = None
        self.copy_out_seconds = 0.0
        """Time spent copying finished READs from staging into destination pools (the
        price of the staging buffer; benchmarks report it)."""
        self._closed = False

    # -- producer side ----------------------------------------------------------------------

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=spec.dtype)

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        check_pool("pool", pool)
        self._check_host("pool", pool)
        if not pool.is_contiguous():
            raise ValueError("the nixl transport registers contiguous pools only")
        entry = self._registered.get(pool.data_ptr())
        if entry is None:
            reg = self._agent.register_memory(pool)
            entry = self._registered[pool.data_ptr()] = (pool, reg)
        # The metadata names every region registered so far; a peer loading a newer copy
        # learns the new pools (add_remote_agent accepts an agent it already knows).
        handle = encode_handle(pool.data_ptr(), self._agent.get_agent_metadata())
        return describe_pool(
            pool, transport=self.name, handle=handle, offset_bytes=0,
            region_bytes=pool.numel() * pool.element_size(),
        )  # fmt: skip

    def unregister_pool(self, pool: torch.Tensor) -> None:
        """Deregisters the pool from NIXL (later metadata leaves it out). It does not fence
        peers that already loaded the metadata: over UCX TCP a READ after deregistration
        still succeeded (measured), so, as the lifetime contract says, keep the memory
        alive until every transfer reading it is final, then call this."""
        entry = self._registered.pop(pool.data_ptr(), None)
        if entry is None:
            raise ValueError("pool is not registered with this transport")
        self._agent.deregister_memory(entry[1])

    # -- consumer side ----------------------------------------------------------------------

    def open_peer(self, descriptor: PoolDescriptor) -> NixlPeer:
        if descriptor.transport != self.name:
            raise ValueError(
                f"descriptor is for transport {descriptor.transport!r}; this is {self.name!r}"
            )
        peer = self._peers.get(descriptor.key)
        if peer is not None:
            return peer
        base_addr, metadata = decode_handle(descriptor.handle)
        try:
            agent_name = self._agent.add_remote_agent(metadata)
        except Exception as exc:  # nixlBind raises its own error types
            raise PeerUnavailableError(
                f"cannot load the NIXL metadata of process {descriptor.owner_pid}'s KV pool: {exc}"
            ) from None
        if isinstance(agent_name, bytes):
            agent_name = agent_name.decode()
        peer = NixlPeer(descriptor, agent_name, base_addr)
        self._peers[descriptor.key] = peer
        return peer

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if self._closed:
            raise ValueError("the nixl transport is closed")
        if not isinstance(peer, NixlPeer):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        if isinstance(dst_pool, torch.Tensor):
            self._check_host("dst_pool", dst_pool)
        plan = plan_submit(peer.descriptor, dst_pool, src_block_ids, dst_block_ids, kv_slice)
        layout = nixl_layout.run_layout(peer.descriptor, plan.slice_args)
        if plan.num_bytes > self._ranges.capacity:
            raise ValueError(
                f"the transfer moves {plan.num_bytes} bytes, more than the nixl transport's "
                f"staging_bytes={self._ranges.capacity}; raise staging_bytes or pull fewer "
                "blocks at once"
            )
        self._reap_quarantined()
        transfer = _Transfer(peer, dst_pool, plan, layout, self._clock(), plan.num_bytes)
        transfer_id = next(self._ids)
        self._transfers[transfer_id] = transfer
        self._stats.num_submitted += 1
        self._stats.num_in_flight += 1
        if plan.mapping.shape[0] == 0:
            self._finish(transfer, TransferStatus.SUCCESS)
        elif self._queued or not self._start(transfer):
            self._queued.append(transfer_id)
        return TransferHandle(self, transfer_id, plan.num_bytes, keepalive=(dst_pool,))

    def poll(self, handle: TransferHandle) -> TransferStatus:
        if handle.result is not None:
            return handle.result.status
        self._reap_quarantined()
        self._start_queued()
        transfer = self._transfers.get(handle.transfer_id)
        if transfer is None:
            raise ValueError(f"unknown transfer {handle.transfer_id} (released or not ours)")
        status = self._progress(transfer)
        if status.is_final:
            handle.result = transfer.result
            handle.keepalive = ()
            del self._transfers[handle.transfer_id]
        return status

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        if handle.result is not None:
            return handle.result.status
        if not timeout_s >= 0:  # also rejects NaN
            raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s!r}")
        end = time.monotonic() + timeout_s
        pause = 20e-6
        while True:
            status = self.poll(handle)
            if status.is_final or time.monotonic() >= end:
                return status
            # UCX's progress thread moves the bytes; back off to at most 1 ms between looks.
            time.sleep(min(pause, max(0.0, end - time.monotonic())))
            pause = min(pause * 2, 1e-3)

    def stats(self) -> TransferStats:
        return dataclasses.replace(self._stats)

    @property
    def num_quarantined_bytes(self) -> int:
        """Staging bytes held by READs given up on that have not ended yet (checked now)."""
        self._reap_quarantined()
        return sum(t.num_staging_bytes for t in self._quarantined)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._copier is not None:  # copies into staging-backed views must end first
            self._copier.shutdown(wait=True)
        for transfer in self._transfers.values():
            if transfer.result is None:
                self._finish(transfer, TransferStatus.FAILED, "the nixl transport was closed")
        # Disconnect first: once the endpoints are gone no READ can still write into the
        # staging buffer, so releasing the requests and the memory after it is safe.
        for agent_name in {p.agent_name for p in self._peers.values()}:
            self._quietly(self._agent.remove_remote_agent, agent_name)
        for transfer in [*self._transfers.values(), *self._quarantined]:
            self._release_request(transfer)
        for dlist in self._remote_dlists.values():
            self._quietly(dlist.release)
        for _, reg in self._registered.values():
            self._quietly(self._agent.deregister_memory, reg)
        if self._staging_reg is not None:
            self._quietly(self._agent.deregister_memory, self._staging_reg)
        self._transfers.clear()
        self._quarantined.clear()
        self._queued.clear()
        self._peers.clear()
        self._remote_dlists.clear()
        self._registered.clear()
        self._staging = None
        self._agent = None

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _check_host(name: str, pool: torch.Tensor) -> None:
        if pool.device.type != "cpu":
            raise NotImplementedError(
                f"{name} is on {pool.device}: the nixl transport moves host (DRAM) pools "
                "only; VRAM registration (GPUDirect RDMA) is the same NIXL call but has not "
                "been run on a GPU yet, so it is not offered untested"
            )

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self._ranges.capacity, dtype=torch.uint8)
            self._staging_reg = self._agent.register_memory(self._staging)
        return self._staging

    def _remote_dlist(self, peer: NixlPeer, layout: nixl_layout.RunLayout) -> object:
        key = (peer.agent_name, peer.base_addr, layout.kind)
        dlist = self._remote_dlists.get(key)
        if dlist is None:
            descs = nixl_layout.remote_descs(peer.descriptor, peer.base_addr, layout)
            dlist = self._agent.prep_xfer_dlist(peer.agent_name, descs, "DRAM")
            self._remote_dlists[key] = dlist
        return dlist

    def _start(self, transfer: _Transfer) -> bool:
        """Posts the READ into a staging range; False when the staging buffer is full."""
        offset = self._ranges.take(transfer.num_staging_bytes)
        if offset is None:
            return False
        transfer.staging_offset = offset
        staging = self._staging_buffer()
        layout = transfer.layout
        mapping = transfer.plan.mapping
        num_runs = mapping.shape[0] * layout.num_units
        try:
            remote = self._remote_dlist(transfer.peer, layout)
            local_descs = nixl_layout.staging_descs(
                staging.data_ptr() + offset, layout.run_bytes, num_runs
            )
            transfer.local_dlist = self._agent.prep_xfer_dlist("", local_descs, "DRAM")
            transfer.xfer = self._agent.make_prepped_xfer(
                "READ", transfer.local_dlist, np.arange(num_runs, dtype=np.int32),
                remote, nixl_layout.remote_indices(mapping[:, 0], layout),
            )  # fmt: skip
        except Exception as exc:  # NIXL raises its own error types (nixlBind.*)
            self._fail_posted(transfer, f"NIXL could not prepare the READ: {exc!r}")
            return True
        state, reason = self._call_state(self._agent.transfer, transfer.xfer)
        if state == "ERR":
            self._fail_posted(transfer, self._peer_error(transfer, reason))
        return True

    @staticmethod
    def _call_state(call: Callable, xfer: object) -> tuple[str, str]:
        """("DONE" | "PROC" | "ERR", reason): a lost peer comes back from NIXL either as "ERR"
        or as an exception (nixlRemoteDisconnectError), depending on when it is noticed."""
        try:
            return call(xfer), ""
        except Exception as exc:
            return "ERR", type(exc).__name__ + (f" {exc}" if str(exc) else "")

    def _start_queued(self) -> None:
        while self._queued:
            transfer = self._transfers.get(self._queued[0])
            if transfer is not None and transfer.result is None and not self._start(transfer):
                return
            self._queued.pop(0)

    def _progress(self, transfer: _Transfer) -> TransferStatus:
        if transfer.result is not None:
            return transfer.result.status
        if transfer.copy_out is not None:  # the READ ended; no deadline for a local copy
            if not transfer.copy_out.done():
                return TransferStatus.TRANSFERRING
            error = transfer.copy_out.exception()
            self._release_request(transfer)
            if error is not None:
                self._finish(transfer, TransferStatus.FAILED, f"copy out of staging: {error!r}")
                return TransferStatus.FAILED
            self._finish(transfer, TransferStatus.SUCCESS)
            return TransferStatus.SUCCESS
        if transfer.xfer is not None:
            state, reason = self._call_state(self._agent.check_xfer_state, transfer.xfer)
            if state == "DONE":
                self._release_xfer(transfer)  # keeps the staging range until the copy ends
                if self._copier is None:
                    self._copier = ThreadPoolExecutor(1, thread_name_prefix="nixl-copy-out")
                transfer.copy_out = self._copier.submit(self._copy_out, transfer)
                return self._progress(transfer)  # a small copy is often done already
            if state == "ERR":
                self._fail_posted(transfer, self._peer_error(transfer, reason))
                return TransferStatus.FAILED
        if self._clock() - transfer.submit_time >= self.deadline_s:
            self._give_up(transfer)
            return TransferStatus.FAILED
        return TransferStatus.PENDING if transfer.xfer is None else TransferStatus.TRANSFERRING

    def _copy_out(self, transfer: _Transfer) -> None:
        """staging ``[num_pairs, num_layers, 2, num_heads, block_size, head_dim]`` -> the
        destination blocks' slice. Runs on the copy-out thread (torch releases the GIL), so
        that `poll` stays cheap: 100 MiB take ~80 ms here, longer than a decode step."""
        plan, desc = transfer.plan, transfer.peer.descriptor
        _, dst_l0, num_layers, _, dst_h0, num_heads = plan.slice_args
        num_pairs = plan.mapping.shape[0]
        shape = (num_pairs, num_layers, 2, num_heads, desc.block_size, desc.head_dim)
        staged = (
            self._staging[transfer.staging_offset : transfer.staging_offset + plan.num_bytes]
            .view(desc.torch_dtype)
            .view(shape)
        )
        dst = transfer.dst_pool
        start = time.perf_counter()
        # One copy_ per block: a memcpy for whole blocks, strided runs for a slice.
        # (index_put_ ran at ~0.35 GB/s here and index_copy_ at half a memcpy's speed.)
        layers, heads = slice(dst_l0, dst_l0 + num_layers), slice(dst_h0, dst_h0 + num_heads)
        for i, dst_block in enumerate(plan.mapping[:, 1].tolist()):
            dst[dst_block, layers, :, heads].copy_(staged[i])
        self.copy_out_seconds += time.perf_counter() - start

    def _give_up(self, transfer: _Transfer) -> None:
        """The deadline passed. A queued transfer holds nothing; a posted READ keeps its
        staging range until NIXL says it ended (`_reap_quarantined`)."""
        what = "still waiting for staging room" if transfer.xfer is None else "READ in flight"
        error = (
            f"KV pull from NIXL agent {transfer.peer.agent_name!r} (process "
            f"{transfer.peer.descriptor.owner_pid}) not done after the nixl transport's "
            f"deadline_s={self.deadline_s} ({what}): the peer is frozen or unreachable"
        )
        if transfer.xfer is None:
            self._queued = [i for i in self._queued if self._transfers.get(i) is not transfer]
        else:
            self._quarantined.append(transfer)
        self._finish(transfer, TransferStatus.FAILED, error)

    def _reap_quarantined(self) -> None:
        still = []
        for transfer in self._quarantined:
            if self._call_state(self._agent.check_xfer_state, transfer.xfer)[0] == "PROC":
                still.append(transfer)
            else:
                self._release_request(transfer)
        self._quarantined = still

    def _fail_posted(self, transfer: _Transfer, error: str) -> None:
        self._release_request(transfer)
        self._finish(transfer, TransferStatus.FAILED, error)

    def _peer_error(self, transfer: _Transfer, reason: str) -> str:
        return (
            f"NIXL reported an error for the READ from agent {transfer.peer.agent_name!r} "
            f"(process {transfer.peer.descriptor.owner_pid}){': ' + reason if reason else ''}; "
            "the peer exited, deregistered the pool, or the network path broke"
        )

    def _release_xfer(self, transfer: _Transfer) -> None:
        for obj in (transfer.xfer, transfer.local_dlist):
            if obj is not None:
                self._quietly(obj.release)
        transfer.xfer = transfer.local_dlist = None

    def _release_request(self, transfer: _Transfer) -> None:
        """Frees the NIXL request and the staging range: only once the READ ended (and the
        copy out of it, if any)."""
        self._release_xfer(transfer)
        if transfer.staging_offset >= 0:
            self._ranges.give_back(transfer.staging_offset, transfer.num_staging_bytes)
            transfer.staging_offset = -1

    def _finish(self, transfer: _Transfer, status: TransferStatus, error: str = "") -> None:
        seconds = self._clock() - transfer.submit_time
        transfer.result = TransferResult(status, error, transfer.plan.num_bytes, seconds)
        self._stats.num_in_flight -= 1
        if status == TransferStatus.SUCCESS:
            self._stats.num_succeeded += 1
            self._stats.bytes_succeeded += transfer.plan.num_bytes
            self._stats.seconds_succeeded += seconds
        else:
            self._stats.num_failed += 1
            logger.warning("nixl transfer failed: %s", error)

    @staticmethod
    def _quietly(call: Callable, *args: object) -> None:
        try:
            call(*args)
        except Exception as exc:  # teardown: report, do not stop releasing the rest
            logger.warning("nixl teardown step %s failed: %s", getattr(call, "__name__", call), exc)

"""Fault injection for tests of the disaggregated protocol: a clock the test moves, and a
`FaultPlan` (held pulls, slow or failing transfers, KV verification) that
``Controller(..., fault_plan=plan)`` hands to its instances.

Why here and not in `DisaggConfig`: these are test instruments, not serving knobs. A plan
holds shared objects (its clock, its sets, its counters), so it needs the thread launcher:
every instance runs in the controller's process and reads the very plan the test changes.
With a plan, each instance loop reads `FaultPlan.now` instead of `time.monotonic`, so lease
expiry (prefill), pull timeouts and pull timings (decode) follow the test's clock: a test
advances ten seconds at once instead of sleeping them.

Where each fault acts:

- ``hold_pulls``: a decode instance starts no pull while it is True (migrations stay
  ANNOUNCED, their KV on the prefill instance); the test may flip it at any time.
- ``transfer_delay_s``, ``fail_transfers``, ``verify_kv``: in `FaultyTransport`, the wrapper
  of each instance's transport (TP = PP = 1: the pools live in the instance's process).
- A TP x PP decode instance pulls in its worker processes, which a shared clock cannot
  reach: `FaultyPuller` applies the delay and the failures to its pulls' reports instead.
  ``verify_kv`` is refused with TP x PP instances (their pools are in worker processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from distserve_rt.config import DisaggConfig, Placement
from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.core.request import Request
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import FinishedPull, Pull, Puller, PullOutcome
from distserve_rt.transfer import (
    KVSlice,
    KVTransport,
    PoolDescriptor,
    TransferHandle,
    TransferResult,
    TransferStats,
    TransferStatus,
)
from distserve_rt.transfer.descriptor import plan_submit


class ManualClock:
    """Monotonic seconds that move only when the test says so (thread-safe: instance
    threads read it while the test thread advances it).

    Args:
        start: the first reading (None: `time.monotonic()` now, so timestamps stay near
            the controller's, which keeps its own clock).
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.monotonic() if start is None else _seconds("start", start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    __call__ = now

    def advance(self, dt: float) -> float:
        """Moves the clock `dt` >= 0 seconds ahead; returns the new reading."""
        if not _seconds("dt", dt) >= 0:
            raise ValueError(f"dt must be >= 0 seconds (the clock is monotonic), got {dt!r}")
        with self._lock:
            self._now += dt
            return self._now

    def set(self, t: float) -> None:
        """Sets the reading to `t`, which must not be earlier than the current one."""
        t = _seconds("t", t)
        with self._lock:
            if t < self._now:
                raise ValueError(f"t must be >= the current reading {self._now}, got {t!r}")
            self._now = t


@dataclass(eq=False)
class FaultPlan:
    """What goes wrong, and when, in a `Controller` started with ``fault_plan=plan`` (and
    ``DisaggConfig(launcher="thread")``). Fields may be changed while it runs."""

    clock: Callable[[], float] | None = None
    """The instances' clock (a `ManualClock`); None: `time.monotonic`."""
    hold_pulls: bool = False
    """Decode instances start no pull while True (migrations stay ANNOUNCED)."""
    transfer_delay_s: float = 0.0
    """A transfer (a pull, TP x PP) completes no sooner than this after its submit, on
    `clock`; the copy itself is not slowed, only its completion is reported later."""
    fail_transfers: Collection[str] | Callable[[str], bool] = frozenset()
    """Request ids (or a predicate on the request id) whose transfers end FAILED."""
    verify_kv: bool = False
    """Hash the source blocks at submit and the destination blocks at completion; a
    mismatch fails the transfer. Results: `num_verified`, `mismatches`."""
    num_verified: int = field(default=0, init=False)
    """Transfers whose destination equalled the source."""
    mismatches: list[str] = field(default_factory=list, init=False)
    """One line per transfer whose destination differed (request id first)."""

    def __post_init__(self) -> None:
        if self.clock is not None and not callable(self.clock):
            raise ValueError(f"clock must be callable (a ManualClock) or None, got {self.clock!r}")
        if not _seconds("transfer_delay_s", self.transfer_delay_s) >= 0:
            raise ValueError(
                f"transfer_delay_s must be >= 0 seconds, got {self.transfer_delay_s!r}"
            )
        if isinstance(self.fail_transfers, str) or not (
            callable(self.fail_transfers) or isinstance(self.fail_transfers, Collection)
        ):
            raise ValueError(
                "fail_transfers must be a collection of request ids or a predicate on the "
                f"request id, got {self.fail_transfers!r}"
            )
        self._lock = threading.Lock()
        self._local = threading.local()  # the request whose transfers this thread submits
        self._source_pools: dict[tuple, torch.Tensor] = {}  # PoolDescriptor.key -> pool

    def check(self, placement: Placement, dc: DisaggConfig) -> None:
        """ValueError unless the instances can share this plan: thread launcher (spawned
        processes would get a copy of it), and no `verify_kv` with TP x PP instances (their
        pools are in worker processes, out of this process's reach)."""
        if dc.launcher != "thread":
            raise ValueError(
                f"a FaultPlan needs DisaggConfig(launcher='thread'), got launcher="
                f"{dc.launcher!r}: its clock and sets are shared objects that spawned "
                "instance processes cannot see"
            )
        if self.verify_kv and placement.max_num_ranks > 1:
            raise ValueError(
                f"FaultPlan(verify_kv=True) hashes pools in the controller's process; the "
                f"placement {placement.describe()} has TP x PP instances, whose pools live in "
                "worker processes: verify with TP = PP = 1 instances"
            )

    def now(self) -> float:
        return time.monotonic() if self.clock is None else self.clock()

    def fails(self, request_id: str | None) -> bool:
        if request_id is None:
            return False
        if callable(self.fail_transfers):
            return bool(self.fail_transfers(request_id))
        return request_id in self.fail_transfers

    @contextlib.contextmanager
    def submitting(self, request_id: str) -> Iterator[None]:
        """Transfers this thread submits inside the block belong to `request_id` (a
        transport does not know requests; `fail_transfers` and the records name them)."""
        previous = getattr(self._local, "request_id", None)
        self._local.request_id = request_id
        try:
            yield
        finally:
            self._local.request_id = previous

    @property
    def current_request(self) -> str | None:
        return getattr(self._local, "request_id", None)

    def record(self, request_id: str | None, mismatch: str | None) -> None:
        with self._lock:
            if mismatch is None:
                self.num_verified += 1
            else:
                self.mismatches.append(f"{request_id}: {mismatch}")


def kv_digest(
    pool: torch.Tensor,
    block_ids: Sequence[int] | np.ndarray,
    part: tuple[int, int, int, int] | None = None,
) -> str:
    """Hash of the bytes of `block_ids`: whole blocks, or the part of each block a sliced
    transfer moves, ``(layer_start, num_layers, head_start, num_heads)``.

    `pool`: ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``.
    """
    ids = torch.as_tensor(np.asarray(block_ids, dtype=np.int64))
    blocks = pool.index_select(0, ids.to(pool.device))
    if part is not None:
        l0, num_layers, h0, num_heads = part
        blocks = blocks[:, l0 : l0 + num_layers, :, h0 : h0 + num_heads]
    data = blocks.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data).hexdigest()


# ---- the transport wrapper -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Peer:
    inner: object
    descriptor: PoolDescriptor


@dataclass(eq=False, slots=True)
class _Transfer:
    inner: TransferHandle
    submit_time: float
    request_id: str | None
    dst_pool: torch.Tensor
    dst_block_ids: np.ndarray
    dst_slice: tuple[int, int, int, int] | None
    src_digest: str | None


class FaultyTransport(KVTransport):
    """`inner` with the plan's faults: completion no sooner than ``transfer_delay_s`` after
    submit (on the plan's clock), FAILED for the requests of ``fail_transfers``, and
    ``verify_kv``. Pools it registers are known to the plan, so a peer's wrapper (in the
    same process) can hash the source blocks."""

    def __init__(self, inner: KVTransport, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.name = inner.name
        self._stats = TransferStats()
        self._ids = itertools.count(1)

    def allocate_pool(self, spec: KVCacheSpec) -> torch.Tensor:
        return self.inner.allocate_pool(spec)

    def register_pool(self, pool: torch.Tensor) -> PoolDescriptor:
        descriptor = self.inner.register_pool(pool)
        self.plan._source_pools[descriptor.key] = pool
        return descriptor

    def mark_ready(self, pool: torch.Tensor) -> None:
        self.inner.mark_ready(pool)

    def open_peer(self, descriptor: PoolDescriptor) -> _Peer:
        return _Peer(self.inner.open_peer(descriptor), descriptor)

    def submit(
        self,
        peer: object,
        dst_pool: torch.Tensor,
        src_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        dst_block_ids: Sequence[int] | np.ndarray | torch.Tensor,
        kv_slice: KVSlice | None = None,
    ) -> TransferHandle:
        if not isinstance(peer, _Peer):
            raise ValueError(f"peer must come from open_peer, got {type(peer).__name__}")
        inner = self.inner.submit(peer.inner, dst_pool, src_block_ids, dst_block_ids, kv_slice)
        src_digest, dst_slice = None, None
        dst_ids = np.asarray(dst_block_ids, dtype=np.int64)
        if self.plan.verify_kv:
            src_digest, dst_slice = self._source_digest(peer.descriptor, dst_pool, src_block_ids,
                                                        dst_ids, kv_slice)  # fmt: skip
        transfer = _Transfer(
            inner, self.plan.now(), self.plan.current_request, dst_pool, dst_ids, dst_slice,
            src_digest,
        )  # fmt: skip
        self._stats.num_submitted += 1
        self._stats.num_in_flight += 1
        return TransferHandle(self, next(self._ids), inner.num_bytes, keepalive=(transfer,))

    def _source_digest(self, descriptor, dst_pool, src_block_ids, dst_ids, kv_slice):
        src_pool = self.plan._source_pools.get(descriptor.key)
        if src_pool is None:
            raise ValueError(
                f"verify_kv: the source pool {descriptor.handle} was not registered through a "
                "FaultyTransport of this plan (only instances in this process can be verified)"
            )
        plan = plan_submit(descriptor, dst_pool, src_block_ids, dst_ids, kv_slice)
        src_l0, dst_l0, num_layers, src_h0, dst_h0, num_heads = plan.slice_args
        src_ids = np.asarray(src_block_ids, dtype=np.int64)
        digest = kv_digest(src_pool, src_ids, (src_l0, num_layers, src_h0, num_heads))
        return digest, (dst_l0, num_layers, dst_h0, num_heads)

    def poll(self, handle: TransferHandle) -> TransferStatus:
        if handle.result is not None:
            return handle.result.status
        transfer: _Transfer = handle.keepalive[0]
        status = transfer.inner.poll()
        if not status.is_final:
            return status
        elapsed = self.plan.now() - transfer.submit_time
        if elapsed < self.plan.transfer_delay_s:
            return TransferStatus.TRANSFERRING
        self._complete(handle, transfer, elapsed)
        return handle.result.status  # type: ignore[union-attr]

    def _complete(self, handle: TransferHandle, transfer: _Transfer, elapsed: float) -> None:
        error = transfer.inner.error if transfer.inner.poll() is TransferStatus.FAILED else ""
        if not error and self.plan.fails(transfer.request_id):
            error = f"injected failure (FaultPlan.fail_transfers has {transfer.request_id!r})"
        if not error and transfer.src_digest is not None:
            got = kv_digest(transfer.dst_pool, transfer.dst_block_ids, transfer.dst_slice)
            mismatch = None if got == transfer.src_digest else (
                f"destination digest {got[:12]} != source {transfer.src_digest[:12]}"
            )  # fmt: skip
            self.plan.record(transfer.request_id, mismatch)
            if mismatch is not None:
                error = f"KV arrived corrupted ({mismatch})"
        status = TransferStatus.FAILED if error else TransferStatus.SUCCESS
        handle.result = TransferResult(status, error, handle.num_bytes, elapsed)
        handle.keepalive = ()
        s = self._stats
        s.num_in_flight -= 1
        if error:
            s.num_failed += 1
        else:
            s.num_succeeded += 1
            s.bytes_succeeded += handle.num_bytes
            s.seconds_succeeded += elapsed

    def wait(self, handle: TransferHandle, timeout_s: float) -> TransferStatus:
        """Polls until final or `timeout_s` real seconds (a driven clock may never move)."""
        if not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        while not (status := self.poll(handle)).is_final and time.monotonic() < deadline:
            time.sleep(0.0005)
        return status

    def stats(self) -> TransferStats:
        return TransferStats(**{f: getattr(self._stats, f) for f in TransferStats.__slots__})

    def close(self) -> None:
        self.inner.close()


# ---- TP x PP decode instances: faults on the reports of their rank pulls -------------------


class FaultyPuller(Puller):
    """`inner`'s pulls (a `rank_kv.RankPuller`, whose copies run in worker processes that
    the plan cannot reach) with the plan's ``transfer_delay_s`` and ``fail_transfers``
    applied to their reports: a pull is reported no sooner than the delay after its start
    (the ranks are polled meanwhile, as for any pull in flight), and a failing request's
    pull is reported FAILED. The timeout is this puller's (`Puller.poll`), on the same
    clock."""

    def __init__(self, inner: Puller, plan: FaultPlan) -> None:
        super().__init__(inner.totals().transport, inner.timeout_s)
        inner.timeout_s = math.inf  # one timeout, this puller's: the same Pull objects
        self.inner = inner
        self.plan = plan
        self.POLL_INTERVAL_S = inner.POLL_INTERVAL_S
        self._held: dict[str, FinishedPull] = {}

    def open_peers(self, descriptors: dict) -> None:
        self.inner.open_peers(descriptors)

    def _submit(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> Pull:
        self.inner.start(request, migration, dst_block_ids, now)
        return self.inner.pulls[request.request_id]

    def _collect_final(self, now: float) -> list[FinishedPull]:
        for finished in self.inner.poll(now):
            request_id = finished.pull.request.request_id
            if self.pulls.get(request_id) is finished.pull:  # not timed out here already
                self._held[request_id] = finished
        done = []
        for request_id, finished in list(self._held.items()):
            if now - finished.pull.start_time < self.plan.transfer_delay_s:
                continue
            del self._held[request_id]
            if finished.outcome is PullOutcome.SUCCESS and self.plan.fails(request_id):
                error = f"injected failure (FaultPlan.fail_transfers has {request_id!r})"
                finished = FinishedPull(finished.pull, PullOutcome.FAILED, now, error)
            else:
                finished.end_time = now
            done.append(finished)
        return done


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    return float(value)

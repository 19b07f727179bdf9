"""The decode side's pull interface: `Puller` and the types of a pull and its outcome.

A decode instance pulls the KV of each admitted migration through one `Puller`:
`kv_migration.KVPuller` when its pool is in its own process (TP = PP = 1),
`rank_kv.RankPuller` when its pools live in TP x PP worker processes. The instance only
ever calls the methods below, so both behave alike: `start` never waits for the copy,
`poll` never blocks and reports each pull once, and a pull not final within `timeout_s`
fails (the rule lives here, once, on the clock the caller passes in).

The puller owns no blocks: the caller allocated ``dst_block_ids`` before `start` and frees
them after the pull is reported (success or not).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from dataclasses import dataclass

import numpy as np

from distserve_rt.core.request import Request
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.protocol import TransferTotals
from distserve_rt.transfer import TransferHandle
from distserve_rt.transfer.per_pair import RankDescriptors

PULL_TIMEOUT_S = 60.0
"""Default `Puller.timeout_s`: a pull of a few blocks takes microseconds to milliseconds,
so one still running after a minute means the machine is stuck."""


class PullOutcome(enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    """The transport reported FAILED or a submit failed (`FinishedPull.error` says why)."""
    TIMED_OUT = "timed_out"
    """Not final within the timeout: the request fails now, but no backend can cancel a
    started copy, so the pull stays in flight (its destination blocks, and the source
    blocks it reads, must stay untouched) and is reported again, with its real outcome,
    once its copies end."""


@dataclass(slots=True)
class Pull:
    """One migration being pulled (by request id in `Puller.pulls`)."""

    request: Request
    migration: Migrate
    handles: list[TransferHandle]
    """The transfers this process submitted, one per source rank slice (`plan_kv_pulls`);
    empty when the copies run in worker processes (`RankPuller`)."""
    dst_block_ids: np.ndarray
    """int32 [num_blocks]: this instance's blocks being written."""
    start_time: float
    """The caller's clock at `Puller.start` (monotonic seconds)."""
    timed_out: bool = False
    """Reported TIMED_OUT already; still in flight until its copies end."""


@dataclass(slots=True)
class FinishedPull:
    pull: Pull
    outcome: PullOutcome
    end_time: float
    error: str | None = None
    num_bytes: int = 0
    """Bytes moved (0 unless SUCCESS)."""
    seconds: float = 0.0
    """Submit -> final of the slowest transfer (0 unless SUCCESS)."""


class Puller(abc.ABC):
    """The in-flight pulls of one decode instance.

    Args:
        transport_name: the transport the pulls go through (named in `totals`).
        timeout_s: a pull not final this many seconds after its `start` is reported
            TIMED_OUT (its request fails with an error naming the timeout) and stays in
            flight until its copies end: no backend can cancel a started copy, so its
            blocks on both sides are not reused before then.
    """

    POLL_INTERVAL_S: float = 0.001
    """How long the instance loop may wait between polls while pulls are in flight."""

    def __init__(self, transport_name: str, timeout_s: float = PULL_TIMEOUT_S) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.pulls: dict[str, Pull] = {}
        """In flight, by request id (read-only for callers)."""
        self._totals = TransferTotals(transport=transport_name)

    @property
    def num_in_flight(self) -> int:
        return len(self.pulls)

    @abc.abstractmethod
    def open_peers(self, descriptors: dict[int, list[bytes] | RankDescriptors]) -> None:
        """Maps each prefill instance's pools once: ``{prefill index: [descriptor bytes of
        each rank, rank order]}``, or a `RankDescriptors` choosing them per rank pair
        (raises `transfer.PeerUnavailableError`)."""

    def start(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> None:
        """Submits the pull of `migration`'s blocks into `dst_block_ids` (int32, same count)
        and returns without waiting for it. Raises when nothing was submitted (then nothing
        writes into `dst_block_ids`)."""
        check_block_counts(request, migration, dst_block_ids)
        if request.request_id in self.pulls:
            raise ValueError(f"request {request.request_id!r} is already being pulled")
        self.pulls[request.request_id] = self._submit(request, migration, dst_block_ids, now)

    def poll(self, now: float) -> list[FinishedPull]:
        """The pulls that became final since the last call, each reported once (never
        blocks). `now` is the caller's clock, the one `start` got: a pull still in flight
        at ``start + timeout_s`` is reported TIMED_OUT once, then again when it is final."""
        done = self._collect_final(now)
        for finished in done:
            del self.pulls[finished.pull.request.request_id]
            if not finished.pull.timed_out:  # counted as a failure when it timed out
                self._count(finished)
        for pull in self.pulls.values():
            if not pull.timed_out and now - pull.start_time >= self.timeout_s:
                pull.timed_out = True
                error = f"KV pull not done after {self.timeout_s} s (the puller's timeout_s)"
                timed_out = FinishedPull(pull, PullOutcome.TIMED_OUT, now, error)
                self._count(timed_out)
                done.append(timed_out)
        return done

    def totals(self) -> TransferTotals:
        """This instance's migrations since start (a copy)."""
        return dataclasses.replace(self._totals)

    @abc.abstractmethod
    def _submit(
        self, request: Request, migration: Migrate, dst_block_ids: np.ndarray, now: float
    ) -> Pull:
        """Submits the copies of one migration (counts already checked); raises when
        nothing was submitted."""

    @abc.abstractmethod
    def _collect_final(self, now: float) -> list[FinishedPull]:
        """The pulls of `pulls` that reached a final status since the last call, each once
        (`poll` removes them from `pulls` and counts them)."""

    def _count(self, finished: FinishedPull) -> None:
        t = self._totals
        if finished.outcome is PullOutcome.SUCCESS:
            t.num_transfers += 1
            t.bytes += finished.num_bytes
            t.seconds += finished.seconds
        else:
            t.num_failures += 1


def check_block_counts(request: Request, migration: Migrate, dst_block_ids: np.ndarray) -> None:
    if len(dst_block_ids) != len(migration.block_ids):
        raise ValueError(
            f"request {request.request_id!r}: {len(migration.block_ids)} source blocks "
            f"but {len(dst_block_ids)} destination blocks"
        )

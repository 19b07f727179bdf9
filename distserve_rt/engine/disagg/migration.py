"""The state of a KV migration, and the one table that says how it may change.

A migration moves one request's KV from the prefill instance that computed it (the
*source*, which holds the blocks) into a decode instance's pool. Two processes follow it:
the controller (which brokers it and owns the request) and the decode instance (which
pulls). Each keeps its own `Migration` record, built from the same `Migrate` message, and
changes it only through `Migration.apply(event)`: every legal change is a row of
`TRANSITIONS`; anything else raises `IllegalTransition` (a protocol bug, never ignored).

States (the source KV is held in every live state and released in every final one)::

    ANNOUNCED ──PULL_STARTED──► PULLING ──PULL_SUCCEEDED──► PULLED
        │  ╲                      │  ╲──PULL_FAILED / DECODE_DIED──► FAILED
        │   ╲──LEASE_EXPIRED──► REVOKING ──REVOKE_CONFIRMED──► REVOKED
        │                         ╲──REVOKE_REFUSED──► PULLING
        ╰──ABORTED──► ABORTING ──(the decode side stops reading)──► ABORTED

Who applies what:

- The decode instance is the authority on whether the pull started: it applies
  PULL_STARTED when its pool has room, PULL_SUCCEEDED / PULL_FAILED when the transfer ends
  (or cannot start), REVOKE_CONFIRMED when a `Revoke` finds the pull not started, ABORTED
  (the controller's `Abort`, or its puller's timeout: the request fails at once, the copy
  cannot be cancelled) and, when nothing is reading, DROPPED. It answers every migration
  it ends, except a revoked one, with a `MigrationDone`.
- The controller never sees PULL_STARTED (no message carries it): its ANNOUNCED means
  "announced, maybe pulling". It applies LEASE_EXPIRED (the prefill instance's report),
  REVOKE_CONFIRMED / REVOKE_REFUSED (the decode instance's answer), PULL_SUCCEEDED /
  PULL_FAILED (`MigrationDone`), ABORTED (the client), DECODE_DIED and REFORWARDED
  (`recovery.py`). When its record reaches a final state it releases the source KV
  (`ReleaseKV` to the prefill instance) and forgets the record: exactly once, because a
  final state has no way out.

A lease that expired is never re-forwarded (the prefill instance reports expiry once, so a
forwarded migration could never be revoked again): REFORWARDED leaves only ANNOUNCED, and
expiry moved the record to REVOKING. A migration is re-forwarded at most `MAX_REFORWARDS`
times: a decode instance dying again while it migrates suggests the pull kills them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MigrationState(enum.Enum):
    ANNOUNCED = "announced"
    """The prefill instance holds the KV; the decode instance queues the migration until its
    pool has room (controller: or it already pulls, unreported)."""
    PULLING = "pulling"
    """The decode instance reads the source blocks."""
    REVOKING = "revoking"
    """Controller only: the lease expired and `Revoke` went to the decode instance."""
    ABORTING = "aborting"
    """The request was aborted; the source stays held until the decode side stops reading
    (a pull in flight cannot be cancelled, so it is dropped after it ends)."""
    PULLED = "pulled"
    """Final: the KV is in the decode pool; the request decodes."""
    FAILED = "failed"
    """Final: the KV did not arrive (transfer error or timeout, or the decode instance died)."""
    REVOKED = "revoked"
    """Final: dropped before any read, after the lease expired."""
    ABORTED = "aborted"
    """Final: the aborted request's migration, no longer read."""

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    @property
    def holds_source(self) -> bool:
        """The prefill instance must keep the source blocks (someone may still read them)."""
        return self not in _FINAL


S = MigrationState
_FINAL = frozenset({S.PULLED, S.FAILED, S.REVOKED, S.ABORTED})


class MigrationEvent(enum.Enum):
    PULL_STARTED = "pull_started"
    PULL_SUCCEEDED = "pull_succeeded"
    PULL_FAILED = "pull_failed"
    """The transfer failed or timed out, or could not start."""
    LEASE_EXPIRED = "lease_expired"
    REVOKE_CONFIRMED = "revoke_confirmed"
    REVOKE_REFUSED = "revoke_refused"
    ABORTED = "aborted"
    DROPPED = "dropped"
    """The decode side let go of an aborted migration: no pull reads the source any more."""
    DECODE_DIED = "decode_died"
    REFORWARDED = "reforwarded"
    """The decode instance died before pulling; another one was chosen (`reforward`)."""


E = MigrationEvent

TRANSITIONS: dict[tuple[MigrationState, MigrationEvent], MigrationState] = {
    (S.ANNOUNCED, E.PULL_STARTED): S.PULLING,
    # The controller's ANNOUNCED includes an unreported pull (see the module docstring).
    (S.ANNOUNCED, E.PULL_SUCCEEDED): S.PULLED,
    (S.ANNOUNCED, E.PULL_FAILED): S.FAILED,
    (S.ANNOUNCED, E.LEASE_EXPIRED): S.REVOKING,
    (S.ANNOUNCED, E.REVOKE_CONFIRMED): S.REVOKED,
    (S.ANNOUNCED, E.ABORTED): S.ABORTING,
    (S.ANNOUNCED, E.DECODE_DIED): S.FAILED,
    (S.ANNOUNCED, E.REFORWARDED): S.ANNOUNCED,
    (S.PULLING, E.PULL_SUCCEEDED): S.PULLED,
    (S.PULLING, E.PULL_FAILED): S.FAILED,
    (S.PULLING, E.ABORTED): S.ABORTING,
    (S.PULLING, E.DECODE_DIED): S.FAILED,
    (S.REVOKING, E.REVOKE_CONFIRMED): S.REVOKED,
    (S.REVOKING, E.REVOKE_REFUSED): S.PULLING,
    # The decode instance finished the pull before it read the Revoke: MigrationDone comes
    # first, then its refusal (ignored: the record is gone).
    (S.REVOKING, E.PULL_SUCCEEDED): S.PULLED,
    (S.REVOKING, E.PULL_FAILED): S.FAILED,
    (S.REVOKING, E.ABORTED): S.ABORTING,
    (S.REVOKING, E.DECODE_DIED): S.FAILED,
    (S.ABORTING, E.DROPPED): S.ABORTED,
    # The Revoke reached the decode instance before the Abort: dropped before any read.
    (S.ABORTING, E.REVOKE_CONFIRMED): S.ABORTED,
    # ... or after the pull started: its MigrationDone follows.
    (S.ABORTING, E.REVOKE_REFUSED): S.ABORTING,
    (S.ABORTING, E.PULL_SUCCEEDED): S.ABORTED,
    (S.ABORTING, E.PULL_FAILED): S.ABORTED,
    (S.ABORTING, E.DECODE_DIED): S.ABORTED,
}

MAX_REFORWARDS = 1
"""Decode deaths a migration survives by going to another decode instance."""


class IllegalTransition(RuntimeError):
    """An event that the migration's state does not allow: a protocol bug."""


@dataclass(slots=True)
class Migration:
    """One request's KV migration, as one process sees it."""

    request_id: str
    prefill_index: int
    """The prefill instance holding the source KV."""
    decode_index: int
    """The decode instance chosen to pull it."""
    block_ids: list[int]
    """The source blocks (in the prefill pool)."""
    state: MigrationState = MigrationState.ANNOUNCED
    num_reforwards: int = 0
    history: list[tuple[float, MigrationEvent, MigrationState]] = field(default_factory=list)
    """(time, event, state after it): what happened, for errors and tests."""
    announcement: object = None
    """Decode side: the `Migrate` message it was announced with (what the puller reads)."""

    def apply(self, event: MigrationEvent, now: float) -> MigrationState:
        """Moves to the state `TRANSITIONS` gives for (state, event); returns it."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalTransition(
                f"migration of request {self.request_id!r}: {event.value} is not allowed in "
                f"state {self.state.value} (history: {self._describe_history()})"
            )
        self.state = new
        self.history.append((now, event, new))
        return new

    def can_reforward(self) -> bool:
        """Not pulled, not expired and not forwarded too often (the caller checks that the
        source instance is alive)."""
        return self.state is MigrationState.ANNOUNCED and self.num_reforwards < MAX_REFORWARDS

    def reforward(self, decode_index: int, now: float) -> None:
        """Its decode instance died before pulling: `decode_index` pulls it instead."""
        if not self.can_reforward():
            raise IllegalTransition(
                f"migration of request {self.request_id!r} cannot be re-forwarded in state "
                f"{self.state.value} after {self.num_reforwards} re-forwards"
            )
        self.apply(MigrationEvent.REFORWARDED, now)
        self.num_reforwards += 1
        self.decode_index = decode_index

    @property
    def holds_source(self) -> bool:
        return self.state.holds_source

    def _describe_history(self) -> str:
        steps = [f"{e.value}->{s.value}" for _, e, s in self.history]
        return ", ".join(["announced", *steps])

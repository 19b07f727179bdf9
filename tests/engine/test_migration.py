"""The migration state table (`engine/disagg/migration.py`), without processes: every
transition, every illegal event, and the two-party protocol (the controller's record and the
decode instance's) run over every interleaving of messages on a driven clock, checking that
the source KV is released exactly once and never while a pull may read it."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distserve_rt.engine.disagg.migration import (
    MAX_REFORWARDS,
    TRANSITIONS,
    IllegalTransition,
    Migration,
    MigrationEvent,
    MigrationState,
)

S, E = MigrationState, MigrationEvent


def _at(state: MigrationState) -> Migration:
    m = Migration("r", prefill_index=0, decode_index=1, block_ids=[4, 5])
    m.state = state
    return m


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair_is_either_a_row_of_the_table_or_refused(state, event):
    m = _at(state)
    if (state, event) in TRANSITIONS:
        assert m.apply(event, 1.5) is TRANSITIONS[state, event] is m.state
        assert m.history == [(1.5, event, m.state)]
    else:
        with pytest.raises(IllegalTransition, match=f"{event.value} is not allowed in state"):
            m.apply(event, 1.5)
        assert m.state is state and not m.history


def test_final_states_hold_nothing_and_have_no_way_out():
    for state in S:
        outgoing = {e for (s, e) in TRANSITIONS if s is state}
        assert state.holds_source is not state.is_final
        assert not state.is_final or not outgoing, state
    assert {s for s in S if s.is_final} == {S.PULLED, S.FAILED, S.REVOKED, S.ABORTED}
    # Every live state can end (no migration holds its source forever by construction).
    for state in S:
        if not state.is_final:
            assert any(TRANSITIONS[state, e].is_final for (s, e) in TRANSITIONS if s is state)


def test_history_names_the_path_in_the_error():
    m = _at(S.ANNOUNCED)
    m.apply(E.PULL_STARTED, 1.0)
    m.apply(E.PULL_SUCCEEDED, 2.0)
    with pytest.raises(IllegalTransition, match="announced, pull_started->pulling"):
        m.apply(E.ABORTED, 3.0)
    assert [t for t, _, _ in m.history] == [1.0, 2.0]


def test_reforward_once_and_never_after_the_lease_expired():
    m = _at(S.ANNOUNCED)
    assert m.can_reforward()
    m.reforward(decode_index=2, now=1.0)
    assert (m.state, m.decode_index, m.num_reforwards) == (S.ANNOUNCED, 2, 1)
    assert MAX_REFORWARDS == 1 and not m.can_reforward()
    with pytest.raises(IllegalTransition, match="after 1 re-forwards"):
        m.reforward(decode_index=3, now=2.0)
    expired = _at(S.ANNOUNCED)
    expired.apply(E.LEASE_EXPIRED, 1.0)
    assert not expired.can_reforward()  # the prefill instance reports expiry only once
    pulling = _at(S.PULLING)
    assert not pulling.can_reforward()


# ---- the protocol: two records, two FIFO pipes, every interleaving --------------------------


class _Protocol:
    """The controller's and the decode instance's handling of one migration, as in
    `engine/controller.py`, `engine/disagg/recovery.py` and `engine/disagg/decode_instance.py`
    (messages only, no KV): the test drives which side acts next."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.controller = Migration("r", 0, 1, [7])
        self.decode: Migration | None = Migration("r", 0, 1, [7])  # Migrate already read
        self.to_decode: deque[str] = deque()
        self.to_controller: deque[tuple[str, bool]] = deque()
        self.pull_in_flight = False
        self.releases: list[float] = []
        self.read_after_release = False
        self.lease_reported = False

    def tick(self) -> None:
        self.clock += 0.25

    # controller side
    def release_if_final(self) -> None:
        if self.controller.state.is_final and not self.releases:
            self.releases.append(self.clock)

    def client_abort(self) -> None:
        if self.controller.state in (S.ANNOUNCED, S.REVOKING, S.PULLING):
            self.controller.apply(E.ABORTED, self.clock)
            self.to_decode.append("abort")

    def lease_expires(self) -> None:
        # The prefill instance reports it once, while it still holds the KV.
        if self.lease_reported or self.releases:
            return
        self.lease_reported = True
        if self.controller.state is S.ANNOUNCED:
            self.controller.apply(E.LEASE_EXPIRED, self.clock)
            self.to_decode.append("revoke")

    def controller_reads(self) -> None:
        kind, ok = self.to_controller.popleft()
        if self.controller.state.is_final:
            return  # settled: a late refusal
        if kind == "done":
            self.controller.apply(E.PULL_SUCCEEDED if ok else E.PULL_FAILED, self.clock)
        elif kind == "revoke":
            event = E.REVOKE_CONFIRMED if ok else E.REVOKE_REFUSED
            if not ok and self.controller.state is S.PULLING:
                return
            self.controller.apply(event, self.clock)
        self.release_if_final()

    # decode side
    def decode_starts_pull(self) -> None:
        if self.decode is not None and self.decode.state is S.ANNOUNCED:
            self.decode.apply(E.PULL_STARTED, self.clock)
            self.pull_in_flight = True

    def pull_ends(self, ok: bool) -> None:
        if not self.pull_in_flight:
            return
        self.pull_in_flight = False
        if self.releases:
            self.read_after_release = True
        assert self.decode is not None
        self.decode.apply(E.PULL_SUCCEEDED if ok else E.PULL_FAILED, self.clock)
        self.to_controller.append(("done", ok and self.decode.state is S.PULLED))
        self.decode = None

    def decode_reads(self) -> None:
        kind = self.to_decode.popleft()
        d = self.decode
        if kind == "revoke":
            if d is None or d.state is not S.ANNOUNCED:
                self.to_controller.append(("revoke", False))
                return
            d.apply(E.REVOKE_CONFIRMED, self.clock)
            self.decode = None
            self.to_controller.append(("revoke", True))
        elif kind == "abort":
            if d is None or d.state is S.ABORTING:
                return
            d.apply(E.ABORTED, self.clock)
            if not self.pull_in_flight:
                d.apply(E.DROPPED, self.clock)
                self.decode = None
                self.to_controller.append(("done", False))

    def enabled(self) -> list:
        actions = [self.client_abort, self.lease_expires, self.decode_starts_pull]
        if self.pull_in_flight:
            actions += [lambda: self.pull_ends(True), lambda: self.pull_ends(False)]
        if self.to_controller:
            actions.append(self.controller_reads)
        if self.to_decode:
            actions.append(self.decode_reads)
        return actions

    def quiescent(self) -> bool:
        return not (self.pull_in_flight or self.to_controller or self.to_decode)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1_000), min_size=1, max_size=40))
def test_every_interleaving_releases_the_source_once_and_never_under_a_pull(choices):
    p = _Protocol()
    for choice in choices:
        actions = p.enabled()
        actions[choice % len(actions)]()
        p.tick()
    # Let the messages in flight arrive and the pull end (a pull ends: the Puller times out).
    while not p.quiescent():
        if p.pull_in_flight:
            p.pull_ends(True)
        elif p.to_decode:
            p.decode_reads()
        else:
            p.controller_reads()
        p.tick()
    assert not p.read_after_release
    assert len(p.releases) <= 1
    if p.controller.state is not S.ANNOUNCED or p.decode is None:
        # Every migration that the decode side let go of is settled on the controller...
        assert p.controller.state.is_final and len(p.releases) == 1
    else:
        # ... and one nobody touched is still announced on both sides, holding its KV.
        assert p.decode.state is S.ANNOUNCED and not p.releases
    if p.controller.state is S.PULLED:
        assert p.decode is None


def test_an_abort_racing_a_revoke_ends_aborted_without_a_release_under_the_pull():
    # Driven step by step: lease expires, the client aborts, the decode side confirms the
    # revoke before it reads the abort.
    p = _Protocol()
    p.lease_expires()
    p.client_abort()
    assert p.controller.state is S.ABORTING
    p.decode_reads()  # revoke: confirmed (not pulling)
    p.decode_reads()  # abort: the record is gone, nothing to do
    p.controller_reads()
    assert p.controller.state is S.ABORTED and p.releases == [0.0]

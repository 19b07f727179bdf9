"""Decode-instance failures while requests migrate (instances on threads; the death is
declared with `recovery.on_instance_death`, as the controller does when a process exits):
announced KV still held on a live prefill instance goes to another decode instance once;
KV already released is never forwarded; aborted migrations do not leak their source KV.
Killed processes: tests/e2e/test_disagg_e2e.py."""

from __future__ import annotations

import time

from distserve_rt.config import DisaggConfig, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg import recovery
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.kv_migration import KVPuller
from distserve_rt.engine.disagg.migration import MigrationState
from distserve_rt.engine.disagg.tracking import Phase
from tests.engine.disagg_helpers import PROMPTS, drain, engine_config, greedy, settle


def _controller(num_decode: int) -> Controller:
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig(num_instances=num_decode))
    # No decode instance ever pulls: every request stays MIGRATING, its KV on the prefill.
    plan = FaultPlan(hold_pulls=True)
    return Controller(engine_config(), placement, DisaggConfig(launcher="thread"), fault_plan=plan)


def _migrating(c: Controller, request_id: str, prompt=PROMPTS[1]):
    c.add_request(request_id, prompt, greedy(8))
    settle(c, lambda: c.requests[request_id].phase is Phase.MIGRATING)
    return c.requests[request_id]


def _die(c: Controller, decode_index: int) -> None:
    recovery.on_instance_death(c, c.decode(decode_index), "declared dead by the test")


def _prefill_kv_usage(c: Controller) -> float:
    return c.stats().instances[0].kv_usage


def test_a_migration_survives_one_decode_death_not_two():
    with _controller(3) as c:
        tracked = _migrating(c, "a")
        first = tracked.decode_index
        _die(c, first)
        assert tracked.phase is Phase.MIGRATING and tracked.decode_index not in (None, first)
        migration = c.migrations["a"]
        assert migration.num_reforwards == 1 and migration.decode_index == tracked.decode_index
        assert migration.state is MigrationState.ANNOUNCED
        _die(c, tracked.decode_index)  # a second death: the pull may be what kills them
        out = drain(c)["a"]
        assert out.outputs[0].finish_reason == "error" and "died" in out.error
        settle(c, lambda: _prefill_kv_usage(c) == 0)  # its source KV was released


def test_released_kv_is_never_forwarded_to_another_decode():
    with _controller(2) as c:
        tracked = _migrating(c, "a")
        decode = tracked.decode_index
        # The decode instance's pull failed and it said so (the prefill instance frees the
        # blocks and may reuse them), then it died before its error Tokens message.
        c._handle_message(
            c.decode(decode), msg.MigrationDone("a", 0, False, time.monotonic(), time.monotonic())
        )
        assert "a" not in c.migrations  # settled: its source KV was released
        _die(c, decode)
        out = drain(c)["a"]
        assert out.outputs[0].finish_reason == "error" and f"decode-{decode} died" in out.error
        assert "a" not in c.migrations


def test_an_aborted_migration_frees_its_source_kv_when_its_decode_dies_first():
    with _controller(2) as c:
        tracked = _migrating(c, "a")
        settle(c, lambda: _prefill_kv_usage(c) > 0)  # load reports come every interval
        decode = tracked.decode_index
        assert c.abort_request("a")
        _die(c, decode)  # before the controller read the decode instance's MigrationDone
        assert drain(c)["a"].outputs[0].finish_reason == "abort"
        assert not c.migrations
        settle(c, lambda: _prefill_kv_usage(c) == 0)


def test_a_pull_that_cannot_start_fails_its_request_and_the_instance_serves_on(monkeypatch):
    start = KVPuller.start

    def start_or_raise(self, request, migration, dst_block_ids, now):
        if request.request_id == "bad":
            raise ValueError("peer pool went away")
        return start(self, request, migration, dst_block_ids, now)

    monkeypatch.setattr(KVPuller, "start", start_or_raise)
    placement = Placement.disaggregated(PhaseConfig(), PhaseConfig())
    with Controller(engine_config(), placement, DisaggConfig(launcher="thread")) as c:
        c.add_request("bad", PROMPTS[1], greedy(8))
        c.add_request("good", PROMPTS[2], greedy(8))
        outputs = drain(c)
        assert outputs["bad"].outputs[0].finish_reason == "error"
        assert "KV pull could not start: ValueError: peer pool went away" in outputs["bad"].error
        assert outputs["good"].outputs[0].finish_reason == "length"
        assert [s.alive for s in c.stats().instances] == [True, True]
        settle(c, lambda: _prefill_kv_usage(c) == 0)


def test_a_migration_whose_lease_expired_is_not_forwarded_when_its_decode_dies():
    # The prefill instance reports an expired lease once; the Revoke went to the decode
    # instance that then died. Forwarded, the migration would never be revoked again.
    with _controller(2) as c:
        tracked = _migrating(c, "a")
        decode = tracked.decode_index
        c._handle_message(c.prefill(0), msg.LeaseExpired("a"))
        migration = c.migrations["a"]
        assert migration.state is MigrationState.REVOKING
        _die(c, decode)  # before its RevokeResult was read
        out = drain(c)["a"]
        assert out.outputs[0].finish_reason == "error" and f"decode-{decode} died" in out.error
        assert migration.num_reforwards == 0 and migration.state is MigrationState.FAILED
        settle(c, lambda: _prefill_kv_usage(c) == 0)  # its source KV was released

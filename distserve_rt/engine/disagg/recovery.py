"""The controller's failure rules: expired KV leases and dead instances.

Lease: a prefill instance reports KV that waited longer than ``kv_lease_timeout_s``
(`LeaseExpired`). The controller asks the chosen decode instance to drop the migration
(`Revoke`); only when it confirms that its pull had not started (`RevokeResult.revoked`)
are the blocks freed (`ReleaseKV`) and the request failed or re-prefilled
(``on_lease_expiry``). If the pull had started, its `MigrationDone` frees them as usual:
the prefill instance never reuses blocks a pull may still read.

Dead instance (process exited, pipe closed, or a `Fatal` report): its requests end with
finish_reason "error" naming the instance, or are re-prefilled on a live prefill instance
(prompt + the tokens generated so far) when ``retry_on_instance_failure`` and the retry
budget allow. Prefill death: its PREFILLING requests. Its announced KV stays readable to
decode instances that already mapped its pool (the region is unlinked at shutdown), so
MIGRATING requests go on. Decode death: its DECODING requests; its MIGRATING ones lose
nothing (their KV is still on the prefill instance, freed only after a MigrationDone) and
are sent to another live decode instance, once (`MAX_REFORWARDS`) and only while their
prefill instance is alive and their lease has not expired; otherwise they fail or retry
like the others. Migrations
aborted while that instance held them get their source KV released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distserve_rt.config import LeaseExpiryAction
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.tracking import Phase, TrackedRequest
from distserve_rt.logger import init_logger

if TYPE_CHECKING:
    from distserve_rt.engine.controller import Controller
    from distserve_rt.engine.disagg.launcher import InstanceHandle

logger = init_logger(__name__)


def on_lease_expired(controller: Controller, m: msg.LeaseExpired) -> None:
    tracked = controller.requests.get(m.request_id)
    if tracked is None or tracked.phase is not Phase.MIGRATING:
        return  # finished, or its pull is done and the release is on its way
    tracked.lease_expired = True
    controller.decode(tracked.decode_index).send(msg.Revoke(m.request_id))  # type: ignore[arg-type]


def on_revoke_result(controller: Controller, m: msg.RevokeResult) -> None:
    if not m.revoked:
        return  # the pull started: MigrationDone frees the KV
    controller.prefill(m.prefill_index).send(msg.ReleaseKV(m.request_id))
    tracked = controller.requests.get(m.request_id)
    if tracked is None:
        return
    timeout = controller.disagg_config.kv_lease_timeout_s
    reason = f"its KV was not pulled by a decode instance within kv_lease_timeout_s={timeout}"
    controller.release_load(tracked)
    if controller.disagg_config.on_lease_expiry is LeaseExpiryAction.RETRY:
        retry_or_fail(controller, tracked, reason)
    else:
        controller.finish(tracked, "error", error=f"request failed: {reason}")


def on_instance_death(controller: Controller, handle: InstanceHandle, reason: str) -> None:
    if not handle.alive:
        return
    handle.alive = False
    logger.error("%s (pid %s) died: %s", handle.name, handle.pid, reason)
    handle.stop(timeout_s=1.0)
    index = handle.spec.index
    if handle.role is InstanceRole.DECODE:
        _release_aborted_migrations(controller, index)
    for tracked in list(controller.requests.values()):
        if handle.role is InstanceRole.PREFILL:
            affected = tracked.phase is Phase.PREFILLING and tracked.prefill_index == index
        else:
            affected = tracked.decode_index == index
            if affected and tracked.phase is Phase.MIGRATING:
                controller.release_load(tracked)
                if _can_reforward(controller, tracked):
                    # Its KV is still held on the prefill instance (released only on a
                    # MigrationDone): another decode instance pulls it, nothing recomputed.
                    tracked.num_reforwards += 1
                    controller.forward_migration(tracked)
                    continue
                if tracked.kv_block_ids is not None:
                    controller.prefill(tracked.prefill_index).send(  # type: ignore[arg-type]
                        msg.ReleaseKV(tracked.request_id)
                    )
                    tracked.kv_block_ids = None
        if not affected:
            continue
        controller.release_load(tracked)
        why = f"{handle.name} died ({reason.splitlines()[-1] if reason else 'unknown'})"
        if controller.disagg_config.retry_on_instance_failure:
            retry_or_fail(controller, tracked, why)
        else:
            controller.finish(tracked, "error", error=f"request failed: {why}")


MAX_REFORWARDS = 1
"""Decode deaths a migration survives by going to another decode instance: a second one
while it migrates suggests the pull itself kills instances, so it is not forwarded again."""


def _can_reforward(controller: Controller, tracked: TrackedRequest) -> bool:
    """Its announced KV is still held (no MigrationDone released it) on a live prefill
    instance (a dead one's pool is not kept readable on every transport: CUDA IPC memory
    of an exited process is gone), its lease has not expired (the prefill instance reports
    that once: a forwarded migration would never be revoked again), and it has not been
    forwarded too often."""
    prefill = controller.prefill(tracked.prefill_index)  # type: ignore[arg-type]
    return (
        tracked.kv_block_ids is not None
        and prefill.alive
        and not tracked.lease_expired
        and tracked.num_reforwards < MAX_REFORWARDS
    )


def _release_aborted_migrations(controller: Controller, decode_index: int) -> None:
    """The dead decode instance will not send MigrationDone for migrations aborted while
    it held them: free their source KV on the prefill instances now."""
    for request_id, (prefill_index, index) in list(controller.aborted_migrations.items()):
        if index == decode_index:
            controller.prefill(prefill_index).send(msg.ReleaseKV(request_id))
            del controller.aborted_migrations[request_id]


def retry_or_fail(controller: Controller, tracked: TrackedRequest, reason: str) -> None:
    """Re-prefills the request (prompt + generated tokens) within the retry budget."""
    budget = controller.disagg_config.max_retries
    if tracked.num_retries >= budget:
        error = f"request failed: {reason}; not retried again (max_retries={budget})"
        controller.finish(tracked, "error", error=error)
        return
    tracked.num_retries += 1
    logger.warning("retrying request %r: %s", tracked.request_id, reason)
    controller.dispatch_prefill(tracked)

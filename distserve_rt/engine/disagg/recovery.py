"""The controller's failure rules: expired KV leases and dead instances. Each is a
transition of the migration record (`migration.py`, which also says who may apply what);
this module decides what happens to the request around it.

Lease: a prefill instance reports KV that waited longer than ``kv_lease_timeout_s``
(`LeaseExpired`): LEASE_EXPIRED, and the controller asks the chosen decode instance to
drop the migration (`Revoke`). Only its confirmation that the pull had not started
(REVOKE_CONFIRMED) frees the blocks and fails or re-prefills the request
(``on_lease_expiry``); if the pull had started (REVOKE_REFUSED), its `MigrationDone` ends
the migration as usual: the prefill instance never reuses blocks a pull may still read.

Dead instance (process exited, pipe closed, or a `Fatal` report): its requests end with
finish_reason "error" naming the instance, or are re-prefilled on a live prefill instance
(prompt + the tokens generated so far) when ``retry_on_instance_failure`` and the retry
budget allow. Prefill death: its PREFILLING requests. Its announced KV stays readable to
decode instances that already mapped its pool (the region is unlinked at shutdown), so
MIGRATING requests go on. Decode death: every migration it held ends (DECODE_DIED, the
source KV released), except one still ANNOUNCED whose source instance lives, which goes to
another live decode instance (REFORWARDED, at most `MAX_REFORWARDS` times: nothing is
recomputed); its DECODING requests and those whose migration ended fail or retry.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from distserve_rt.config import LeaseExpiryAction
from distserve_rt.core.stop_checker import FinishReason
from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.migration import MigrationEvent, MigrationState
from distserve_rt.engine.disagg.tracking import Phase, TrackedRequest
from distserve_rt.logger import init_logger

if TYPE_CHECKING:
    from distserve_rt.engine.controller import Controller
    from distserve_rt.engine.disagg.launcher import InstanceHandle

logger = init_logger(__name__)


def on_lease_expired(controller: Controller, m: msg.LeaseExpired) -> None:
    migration = controller.migrations.get(m.request_id)
    if migration is None or migration.state is not MigrationState.ANNOUNCED:
        return  # settled (its release is on its way), or aborted meanwhile
    migration.apply(MigrationEvent.LEASE_EXPIRED, time.monotonic())
    controller.decode(migration.decode_index).send(msg.Revoke(m.request_id))


def on_revoke_result(controller: Controller, m: msg.RevokeResult) -> None:
    migration = controller.migrations.get(m.request_id)
    if migration is None:
        return  # its MigrationDone settled it first
    if not m.revoked:
        migration.apply(MigrationEvent.REVOKE_REFUSED, time.monotonic())
        return  # the pull started: its MigrationDone settles it
    migration.apply(MigrationEvent.REVOKE_CONFIRMED, time.monotonic())
    controller.settle_migration(migration)
    tracked = controller.requests.get(m.request_id)
    if tracked is None:
        return  # aborted while the Revoke was on its way
    timeout = controller.disagg_config.kv_lease_timeout_s
    reason = f"its KV was not pulled by a decode instance within kv_lease_timeout_s={timeout}"
    controller.release_load(tracked)
    if controller.disagg_config.on_lease_expiry is LeaseExpiryAction.RETRY:
        retry_or_fail(controller, tracked, reason)
    else:
        controller.finish(tracked, FinishReason.ERROR, error=f"request failed: {reason}")


def on_instance_death(controller: Controller, handle: InstanceHandle, reason: str) -> None:
    if not handle.alive:
        return
    handle.alive = False
    logger.error("%s (pid %s) died: %s", handle.name, handle.pid, reason)
    handle.stop(timeout_s=1.0)
    index = handle.spec.index
    if handle.role is InstanceRole.DECODE:
        _end_migrations_of(controller, index)
    for tracked in list(controller.requests.values()):
        if handle.role is InstanceRole.PREFILL:
            affected = tracked.phase is Phase.PREFILLING and tracked.prefill_index == index
        else:
            affected = tracked.decode_index == index
        if not affected:
            continue
        controller.release_load(tracked)
        why = f"{handle.name} died ({reason.splitlines()[-1] if reason else 'unknown'})"
        if controller.disagg_config.retry_on_instance_failure:
            retry_or_fail(controller, tracked, why)
        else:
            controller.finish(tracked, FinishReason.ERROR, error=f"request failed: {why}")


def _end_migrations_of(controller: Controller, decode_index: int) -> None:
    """Re-forwards the dead decode instance's migrations that can be (their KV is still
    held on a live prefill instance: a dead one's pool is not kept readable on every
    transport, CUDA IPC memory of an exited process is gone) and ends the others."""
    now = time.monotonic()
    for migration in list(controller.migrations.values()):
        if migration.decode_index != decode_index:
            continue
        tracked = controller.requests.get(migration.request_id)
        target = controller.least_loaded_decode()
        if (
            tracked is not None
            and target is not None
            and migration.can_reforward()
            and controller.prefill(migration.prefill_index).alive
        ):
            controller.release_load(tracked)
            migration.reforward(target.spec.index, now)
            controller.send_migration(tracked, migration)
            continue
        migration.apply(MigrationEvent.DECODE_DIED, now)
        controller.settle_migration(migration)


def retry_or_fail(controller: Controller, tracked: TrackedRequest, reason: str) -> None:
    """Re-prefills the request (prompt + generated tokens) within the retry budget."""
    budget = controller.disagg_config.max_retries
    if tracked.num_retries >= budget:
        error = f"request failed: {reason}; not retried again (max_retries={budget})"
        controller.finish(tracked, FinishReason.ERROR, error=error)
        return
    tracked.num_retries += 1
    logger.warning("retrying request %r: %s", tracked.request_id, reason)
    controller.dispatch_prefill(tracked)

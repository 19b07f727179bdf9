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
nothing (their KV is still on the prefill instance, freed only after a pull completed) and
are sent to another live decode instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distserve_rt.engine.disagg import messages as msg
from distserve_rt.engine.disagg.instance import InstanceRole
from distserve_rt.engine.disagg.tracking import Phase, TrackedRequest
from distserve_rt.engine.placement import LeaseExpiryAction
from distserve_rt.logger import init_logger

if TYPE_CHECKING:
    from distserve_rt.engine.controller import Controller
    from distserve_rt.engine.disagg.launcher import InstanceHandle

logger = init_logger(__name__)


def on_lease_expired(controller: Controller, m: msg.LeaseExpired) -> None:
    tracked = controller.requests.get(m.request_id)
    if tracked is None or tracked.phase is not Phase.MIGRATING:
        return  # finished, or its pull is done and the release is on its way
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
    for tracked in list(controller.requests.values()):
        if handle.role is InstanceRole.PREFILL:
            affected = tracked.phase is Phase.PREFILLING and tracked.prefill_index == index
        else:
            affected = tracked.decode_index == index
            if affected and tracked.phase is Phase.MIGRATING:
                # Its KV is still held on the prefill instance (released only on a
                # MigrationDone): another decode instance pulls it, nothing is recomputed.
                controller.release_load(tracked)
                controller.forward_migration(tracked)
                continue
        if not affected:
            continue
        controller.release_load(tracked)
        why = f"{handle.name} died ({reason.splitlines()[-1] if reason else 'unknown'})"
        if controller.disagg_config.retry_on_instance_failure:
            retry_or_fail(controller, tracked, why)
        else:
            controller.finish(tracked, "error", error=f"request failed: {why}")


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

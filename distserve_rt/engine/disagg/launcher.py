"""Starting instances: one spawned process each (or a thread, for fast tests), and the
controller's handle on it (pipe, liveness, last load report)."""

from __future__ import annotations

import dataclasses

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.disagg.child import ChildHandle
from distserve_rt.engine.disagg.devices import instance_devices
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.instance import InstanceRole, InstanceSpec, run_instance
from distserve_rt.engine.disagg.messages import InstanceStatus


class InstanceHandle(ChildHandle):
    """The controller's end of one instance."""

    def __init__(self, spec: InstanceSpec, in_process: bool) -> None:
        super().__init__(
            run_instance, spec, spec.name, in_process=in_process,
            daemon=spec.num_ranks == 1, sender_name=f"controller-{spec.name}",
        )  # fmt: skip
        self.spec = spec
        self.status: InstanceStatus | None = None
        self.num_queued_tokens = 0
        """Prefill: prompt tokens dispatched and not prefilled yet."""
        self.num_assigned = 0
        """Decode: requests forwarded to it and not finished."""
        self.death_reason: str | None = None
        """Why it died when its launcher knows more than "its process exited" (Ray's)."""

    def select_peer_descriptors(self, descriptors: dict[int, list[bytes]]) -> dict[int, list]:
        """The prefill pools' descriptors this decode instance reads: all of them, since every
        pair shares the one transport here (`ray_launcher` picks one per pair)."""
        return descriptors

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> InstanceRole:
        return self.spec.role


def instance_specs(
    config: EngineConfig,
    placement: Placement,
    dc: DisaggConfig,
    transport: str,
    fault_plan: FaultPlan | None = None,
) -> list[InstanceSpec]:
    """One spec per instance: prefill instances first; each phase's engine config carries
    its TP x PP and each instance's its device (`devices.instance_devices`, which raises
    for what cannot run); CPU instances are pinned to their cores when asked (their
    workers split them). Every spec carries `fault_plan` (tests, thread launcher).
    """
    p = placement
    assert p.prefill is not None and p.decode is not None
    devices = instance_devices(config, p, dc, transport)
    roles = [InstanceRole.PREFILL] * p.prefill.num_instances
    roles += [InstanceRole.DECODE] * p.decode.num_instances
    pin = dc.pin_cpus and dc.launcher == "process" and config.device == "cpu"
    groups = p.cpu_core_groups() if pin else [None] * len(roles)
    index = {InstanceRole.PREFILL: 0, InstanceRole.DECODE: 0}
    specs = []
    configs = {
        role: dataclasses.replace(
            config, tensor_parallel_size=phase.tp, pipeline_parallel_size=phase.pp
        )
        for role, phase in ((InstanceRole.PREFILL, p.prefill), (InstanceRole.DECODE, p.decode))
    }
    for role, cores, device in zip(roles, groups, devices, strict=True):
        spec = InstanceSpec(
            role, index[role], dataclasses.replace(configs[role], device=device.device), dc,
            transport, cores, prefill_parallelism=p.prefill.parallelism,
            shares_gpu=device.shares_gpu, fault_plan=fault_plan,
        )  # fmt: skip
        specs.append(spec)
        index[role] += 1
    return specs

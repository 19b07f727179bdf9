"""Starting instances: one spawned process each (or a thread, for fast tests), and the
controller's handle on it (pipe, liveness, last load report)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from multiprocessing.connection import Connection

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.disagg.devices import instance_devices
from distserve_rt.engine.disagg.faults import FaultPlan
from distserve_rt.engine.disagg.instance import InstanceRole, InstanceSpec, run_instance
from distserve_rt.engine.disagg.messages import InstanceStatus
from distserve_rt.engine.disagg.pipe_sender import PipeSender


class InstanceHandle:
    """The controller's end of one instance."""

    def __init__(self, spec: InstanceSpec, in_process: bool) -> None:
        self.spec = spec
        parent, child = multiprocessing.Pipe(duplex=True)
        self.conn: Connection = parent
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        if in_process:
            self._thread = threading.Thread(
                target=run_instance, args=(spec, child, True), name=spec.name, daemon=True
            )
            self._thread.start()
        else:
            ctx = multiprocessing.get_context("spawn")
            # A daemonic process may not start children; a TP x PP instance starts its
            # worker processes (they exit with it: their pipes to it close).
            self._process = ctx.Process(
                target=run_instance, args=(spec, child), name=f"drt-{spec.name}",
                daemon=spec.num_ranks == 1,
            )  # fmt: skip
            self._process.start()
            child.close()  # only the child holds it now: its death closes the pipe
        self._sender = PipeSender(self.conn, f"controller-{spec.name}")
        self.alive = True
        self.status: InstanceStatus | None = None
        self.num_queued_tokens = 0
        """Prefill: prompt tokens dispatched and not prefilled yet."""
        self.num_assigned = 0
        """Decode: requests forwarded to it and not finished."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> InstanceRole:
        return self.spec.role

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def sentinel(self) -> int | None:
        """Readable when the process has exited (None for a thread)."""
        return None if self._process is None else self._process.sentinel

    def is_running(self) -> bool:
        if self._process is not None:
            return self._process.is_alive()
        return self._thread is not None and self._thread.is_alive()

    def send(self, message: object) -> bool:
        """Sends unless the instance is dead; False when it could not."""
        if not self.alive:
            return False
        return self._sender.send(message)  # never blocks (see PipeSender)

    def stop(self, timeout_s: float) -> None:
        """Joins the instance (after Shutdown was sent), killing a process that hangs."""
        self.alive = False
        self._sender.close(timeout_s)
        if self._process is not None:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout_s)
        elif self._thread is not None:
            self._thread.join(timeout_s)
        self.conn.close()


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

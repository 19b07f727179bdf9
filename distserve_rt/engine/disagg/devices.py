"""The device each instance of a disaggregated placement runs on, and the start-up refusals
of device, transport and launcher combinations that cannot work.

CPU: every instance runs on "cpu" and pulls through ``shm``. GPU (``device="cuda"``): each
instance gets ``tp * pp`` consecutive GPUs (`Placement.gpu_groups`: prefill instances
first, one GPU per rank, or shared round-robin with ``DisaggConfig.share_gpus``); its engine
config says ``cuda:<first>`` and rank r of a TP x PP instance uses GPU first + r (as
`distributed.launch.LaunchConfig` numbers them); pulls go through ``cuda_ipc``.

Runs in the controller's process before any instance starts. It asks torch how many GPUs
there are (`torch.cuda.device_count`, which does not create a CUDA context); nothing else
here touches CUDA.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from distserve_rt import _native
from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.transfer import KVTransport, create_transport

TRANSPORT_OF_DEVICE = {"cpu": "shm", "cuda": "cuda_ipc"}
"""The local transport that moves KV between pools on each device type."""
NETWORK_TRANSPORTS = {"cpu": ("nixl",), "cuda": ()}
"""Transports that also reach other machines, by device type (nixl: host pools only until
its VRAM path has run on a GPU)."""


@dataclass(frozen=True, slots=True)
class InstanceDevice:
    """Where one instance runs."""

    device: str
    """"cpu", or "cuda:<i>": the instance's first GPU (its rank r uses GPU i + r)."""
    gpus: tuple[int, ...] = ()
    """GPU indices of its ranks, rank order (empty on CPU)."""
    shares_gpu: bool = False
    """Another instance's rank uses one of these GPUs too (share_gpus): KV sizing then
    counts only this instance's memory (`worker.kv_sizing.num_gpu_blocks`)."""


def instance_devices(
    config: EngineConfig, placement: Placement, dc: DisaggConfig, transport: str
) -> list[InstanceDevice]:
    """One `InstanceDevice` per instance, prefill instances first.

    Raises ValueError (naming the setting and what is allowed) for: a transport that does
    not move pools of `config.device` (or ``fake`` outside one process);
    ``device="cuda:<i>"`` (the placement assigns GPUs); the thread launcher on GPU; too few
    GPUs for the placement; instances sharing a GPU whose gpu_memory_utilization adds up to
    more than the GPU. RuntimeError when the CUDA module is missing.
    """
    assert placement.prefill is not None and placement.decode is not None
    num_instances = placement.prefill.num_instances + placement.decode.num_instances
    device_type = torch.device(config.device).type
    if transport == "fake":
        check_fake_transport(device_type, placement, dc)
        return [InstanceDevice("cpu")] * num_instances
    check_transport(device_type, transport)
    if device_type == "cpu":
        return [InstanceDevice("cpu")] * num_instances
    check_gpu_config(config, dc)
    groups = placement.gpu_groups(visible_gpus(placement), dc.share_gpus)
    num_ranks_per_gpu = Counter(gpu for group in groups for gpu in group)
    check_memory_share(config.gpu_memory_utilization, max(num_ranks_per_gpu.values()))
    return [
        InstanceDevice(f"cuda:{group[0]}", group, any(num_ranks_per_gpu[g] > 1 for g in group))
        for group in groups
    ]


def check_transport(device_type: str, transport: str) -> None:
    """The transport must move pools of this device type (no staging through the host)."""
    wanted = TRANSPORT_OF_DEVICE[device_type]
    if transport != wanted and transport not in NETWORK_TRANSPORTS[device_type]:
        allowed = " or ".join(repr(t) for t in (wanted, *NETWORK_TRANSPORTS[device_type]))
        raise ValueError(
            f"DisaggConfig(transport={transport!r}) cannot move KV pools on device "
            f"{device_type!r}; use {allowed} (or 'auto')"
        )


def check_fake_transport(device_type: str, placement: Placement, dc: DisaggConfig) -> None:
    """The fake transport's pools live in a table of one process: every pool must be in
    the controller's (thread launcher, no worker processes), on the CPU."""
    if device_type != "cpu" or dc.launcher != "thread" or placement.max_num_ranks > 1:
        raise ValueError(
            f"DisaggConfig(transport='fake') moves pools within one process: it needs "
            f"device='cpu', launcher='thread' and TP = PP = 1 instances, got "
            f"device={device_type!r}, launcher={dc.launcher!r}, {placement.describe()}"
        )


def check_gpu_config(config: EngineConfig, dc: DisaggConfig) -> None:
    if config.device != "cuda":
        raise ValueError(
            f"device={config.device!r}: a disaggregated placement assigns each instance its "
            "own GPUs (Placement.gpu_groups); pass device='cuda' and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if dc.launcher == "thread":
        # cuda_ipc.py: a process cannot open the IPC handles it exported, and thread
        # instances all live in the controller's process.
        raise ValueError(
            "DisaggConfig(launcher='thread') cannot run GPU instances: they pull KV through "
            "CUDA IPC, whose handles cannot be opened in the process that exported them; "
            "use launcher='process'"
        )
    if not _native.has_cuda_module():
        raise RuntimeError(
            "device='cuda' needs the CUDA module distserve_rt._cuda (kernels and the "
            "cuda_ipc transport); it is built when nvcc is found at install time "
            "(force with DRT_CUDA=1)"
        )


def visible_gpus(placement: Placement) -> int:
    """`torch.cuda.device_count()`; ValueError when it is 0."""
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus < 1:
        raise ValueError(
            f"device='cuda' but torch sees no GPU (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, torch.cuda.device_count() is {num_gpus}); the "
            f"placement ({placement.describe()}) needs at least one"
        )
    return num_gpus


def check_memory_share(gpu_memory_utilization: float, num_sharers: int) -> None:
    """Instances sharing a GPU each take `gpu_memory_utilization` of it: together they must
    fit (`num_sharers`: the most instance ranks on one GPU)."""
    if gpu_memory_utilization * num_sharers > 1:
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} is each instance's share of a "
            f"GPU, and {num_sharers} instance ranks share one GPU: {num_sharers} x "
            f"{gpu_memory_utilization} > 1; set gpu_memory_utilization <= "
            f"{1 / num_sharers:.3g}"
        )


def make_transport(name: str, device: str | torch.device) -> KVTransport:
    """The transport `name` for pools on `device` (cuda_ipc binds to that GPU)."""
    if name == "cuda_ipc":
        return create_transport(name, device=torch.device(device))
    return create_transport(name)

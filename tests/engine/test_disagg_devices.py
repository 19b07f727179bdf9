"""GPU placements without a GPU: which GPUs each instance gets, the start-up refusals (torch's
device count mocked; nothing here creates a CUDA context), and what the instance specs and
processes of a GPU placement are built with."""

from __future__ import annotations

import argparse

import pytest
import torch

from distserve_rt.config import DisaggConfig, GiB, PhaseConfig, Placement
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.disagg import devices, instance
from distserve_rt.engine.disagg.instance import InstanceRole, InstanceSpec
from distserve_rt.engine.disagg.launcher import instance_specs
from distserve_rt.entrypoints.engine_args import add_engine_args
from distserve_rt.worker import kv_sizing
from tests.engine.disagg_helpers import engine_config


def _placement(num_prefill=1, num_decode=1, prefill=(1, 1), decode=(1, 1)) -> Placement:
    return Placement.disaggregated(
        PhaseConfig(tp=prefill[0], pp=prefill[1], num_instances=num_prefill),
        PhaseConfig(tp=decode[0], pp=decode[1], num_instances=num_decode),
    )


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: torch reports n GPUs (0: none) and the CUDA module is present."""

    def set_count(num_gpus: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: num_gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: num_gpus)
        monkeypatch.setattr(devices._native, "has_cuda_module", lambda: True)

    return set_count


# ---- Placement.gpu_groups (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    "placement, num_gpus, share, groups",
    [
        (_placement(), 2, False, [(0,), (1,)]),
        (_placement(2, 1, decode=(2, 1)), 4, False, [(0,), (1,), (2, 3)]),
        (_placement(prefill=(1, 2)), 8, False, [(0, 1), (2,)]),
        (_placement(prefill=(2, 1), decode=(2, 1)), 4, False, [(0, 1), (2, 3)]),
        # Sharing: round-robin; with enough GPUs nothing is shared.
        (_placement(), 1, True, [(0,), (0,)]),
        (_placement(1, 2), 2, True, [(0,), (1,), (0,)]),
        (_placement(), 2, True, [(0,), (1,)]),
        # A group that would run past the last GPU starts again at 0 (ranks stay consecutive).
        (_placement(prefill=(2, 1), decode=(2, 1)), 3, True, [(0, 1), (0, 1)]),
        (_placement(2, 1, decode=(2, 1)), 2, True, [(0,), (1,), (0, 1)]),
    ],
)
def test_gpu_groups(placement, num_gpus, share, groups):
    assert placement.gpu_groups(num_gpus, share) == groups


def test_gpu_groups_refuses_too_few_gpus_naming_the_placement():
    message = (
        r"the placement \(1 prefill x \(tp=1, pp=1\) \+ 1 decode x \(tp=2, pp=1\)\) needs 3 "
        r"GPUs, one per instance rank, but 2 are visible \(torch.cuda.device_count\(\)\).*"
        r"share_gpus=True"
    )
    with pytest.raises(ValueError, match=message):
        _placement(decode=(2, 1)).gpu_groups(2)
    with pytest.raises(ValueError, match="instance of 2 ranks, which need distinct GPUs"):
        _placement(decode=(2, 1)).gpu_groups(1, share=True)
    with pytest.raises(ValueError, match="num_gpus must be an int >= 1, got 0"):
        _placement().gpu_groups(0, share=True)


def test_share_gpus_is_validated():
    assert DisaggConfig().share_gpus is False
    with pytest.raises(ValueError, match="share_gpus must be a bool, got 'yes'"):
        DisaggConfig(share_gpus="yes")  # type: ignore[arg-type]


# ---- instance specs of a GPU placement ---------------------------------------------------


def test_gpu_specs_carry_own_gpu_and_cuda_ipc(gpus):
    gpus(4)
    dc = DisaggConfig()  # pin_cpus=True: GPU instances are not pinned all the same
    transport = dc.transport_name("cuda")
    assert transport == "cuda_ipc"
    specs = instance_specs(
        engine_config(device="cuda"), _placement(2, 1, decode=(2, 1)), dc, transport
    )
    assert [(s.role, s.index) for s in specs] == [
        (InstanceRole.PREFILL, 0), (InstanceRole.PREFILL, 1), (InstanceRole.DECODE, 0),
    ]  # fmt: skip
    assert [s.engine_config.device for s in specs] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [s.engine_config.tensor_parallel_size for s in specs] == [1, 1, 2]
    assert all(s.transport == "cuda_ipc" and s.cpu_cores is None for s in specs)
    assert not any(s.shares_gpu for s in specs)


def test_shared_gpu_specs_and_memory_check(gpus):
    gpus(1)
    dc = DisaggConfig(share_gpus=True)
    config = engine_config(device="cuda", gpu_memory_utilization=0.4)
    specs = instance_specs(config, _placement(), dc, "cuda_ipc")
    assert [(s.engine_config.device, s.shares_gpu) for s in specs] == [
        ("cuda:0", True), ("cuda:0", True),
    ]  # fmt: skip
    # The user's fraction is each sharer's: two at 0.9 do not fit one GPU.
    message = r"gpu_memory_utilization=0.9 .* 2 instance ranks share one GPU.* <= 0.5"
    with pytest.raises(ValueError, match=message):
        instance_specs(engine_config(device="cuda"), _placement(), dc, "cuda_ipc")
    gpus(2)  # 1P2D on 2 GPUs: GPU 0 holds prefill-0 and decode-1, GPU 1 decode-0 alone
    specs = instance_specs(config, _placement(1, 2), dc, "cuda_ipc")
    assert [(s.engine_config.device, s.shares_gpu) for s in specs] == [
        ("cuda:0", True), ("cuda:1", False), ("cuda:0", True),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "device, dc, num_gpus, error, message",
    [
        ("cuda", DisaggConfig(), 0, ValueError, r"torch sees no GPU .*device_count\(\) is 0"),
        ("cuda", DisaggConfig(), 1, ValueError, "needs 2 GPUs, one per instance rank, but 1"),
        ("cuda:1", DisaggConfig(), 2, ValueError, "pass device='cuda' .* CUDA_VISIBLE_DEVICES"),
        ("cuda", DisaggConfig(launcher="thread"), 2, ValueError, "use launcher='process'"),
        ("cuda", DisaggConfig(transport="shm"), 2, ValueError, "transport='shm'.*'cuda_ipc'"),
        (
            "cpu",
            DisaggConfig(transport="cuda_ipc"),
            2,
            ValueError,
            "device 'cpu'; use 'shm' or 'nixl'",
        ),
        ("cuda", DisaggConfig(transport="nixl"), 2, ValueError, "transport='nixl'.*use 'cuda_ipc'"),
    ],
)
def test_startup_refusals(gpus, device, dc, num_gpus, error, message):
    gpus(num_gpus)
    config = engine_config(device=device)
    with pytest.raises(error, match=message):
        instance_specs(config, _placement(), dc, dc.transport_name(device))


def test_nixl_moves_cpu_pools_and_is_a_cli_choice():
    specs = instance_specs(engine_config(), _placement(), DisaggConfig(transport="nixl"), "nixl")
    assert {s.transport for s in specs} == {"nixl"}
    with pytest.raises(ValueError, match="'nixl' or 'fake', got 'rdma'"):
        DisaggConfig(transport="rdma")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--kv-transport", "nixl"]).transport == "nixl"


def test_missing_cuda_module_is_refused(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setattr(devices._native, "has_cuda_module", lambda: False)
    with pytest.raises(RuntimeError, match="needs the CUDA module distserve_rt._cuda"):
        instance_specs(engine_config(device="cuda"), _placement(), DisaggConfig(), "cuda_ipc")


def test_controller_refuses_before_starting_any_instance(gpus, monkeypatch):
    gpus(1)
    started = []
    monkeypatch.setattr(
        "distserve_rt.engine.controller.InstanceHandle", lambda *a: started.append(a)
    )
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        Controller(engine_config(device="cuda"), _placement())
    assert started == []


# ---- what the processes do with it ------------------------------------------------------


@pytest.mark.parametrize("tp, set_device", [(1, True), (2, False)])
def test_instance_process_sets_its_gpu_before_cuda(monkeypatch, tp, set_device):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    config = engine_config(device="cuda:1", tensor_parallel_size=tp)
    spec = InstanceSpec(InstanceRole.DECODE, 0, config, DisaggConfig(), "cuda_ipc")
    instance._configure_process(spec)
    # A TP x PP instance's own process holds no model: its ranks set their GPUs.
    assert calls == ([torch.device("cuda", 1)] if set_device else [])


def test_cuda_ipc_transport_is_bound_to_the_instance_gpu(monkeypatch):
    made = []
    monkeypatch.setattr(devices, "create_transport", lambda name, **kw: made.append((name, kw)))
    devices.make_transport("cuda_ipc", "cuda:3")
    devices.make_transport("shm", "cpu")
    assert made == [("cuda_ipc", {"device": torch.device("cuda", 3)}), ("shm", {})]


def test_shared_gpu_kv_sizing_ignores_the_other_instances_memory(monkeypatch):
    total, peak = 100 * GiB, 2 * GiB
    cuda = torch.cuda
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(cuda, name, lambda *a: None)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: peak)
    monkeypatch.setattr(cuda, "memory_reserved", lambda *a: peak)
    # The other instance on this GPU already holds 58 GiB.
    monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (40 * GiB, total))
    args = (lambda: None, 0.4, GiB // 4, 10**6, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="no KV block fits"):
        kv_sizing.num_gpu_blocks(*args)  # device-wide: the sharer's memory counted as ours
    expected = (int(0.4 * total) - peak - kv_sizing.SHARED_GPU_NON_TORCH_BYTES) // (GiB // 4)
    assert kv_sizing.num_gpu_blocks(*args, shared=True) == expected


def test_share_gpus_flag():
    import argparse

    from distserve_rt.entrypoints import engine_args

    parser = argparse.ArgumentParser()
    engine_args.add_engine_args(parser)
    for argv, share in (([], False), (["--share-gpus"], True)):
        args = parser.parse_args(["--placement", "disaggregated", "--device", "cuda", *argv])
        config, placement, dc = engine_args.configs_from_args(args)
        assert (config.device, placement.is_disaggregated, dc.share_gpus) == ("cuda", True, share)

"""The launcher without a model: ranks and groups, errors and deaths surface at the
driver (never a hang), shutdown leaves no process behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from distserve_rt.distributed.launch import (
    LaunchConfig,
    WorkerFailedError,
    WorkerGroup,
    recv_message,
    send_ok,
)


def _echo_ranks(ctx, conn) -> None:
    """Answers its layout and a TP all-reduce of its rank, then serves until told to exit."""
    p = ctx.parallel
    total = p.all_reduce(torch.tensor([float(ctx.rank)]))
    send_ok(conn, (ctx.rank, p.tp_rank, p.pp_rank, ctx.prev_rank, ctx.next_rank, total.item()))
    while (message := recv_message(conn)) is not None:
        if message == "raise":
            raise RuntimeError("boom from the worker")
        if message == "hang":
            time.sleep(3600)  # stands for a collective whose peer died: only a kill ends it
        send_ok(conn, message)


def test_layout_all_reduce_errors_and_shutdown():
    group = WorkerGroup(LaunchConfig(tp_size=2, pp_size=2, timeout_s=60), _echo_ranks)
    try:
        answers = group.gather(timeout_s=60)
        # rank = pp_rank * tp + tp_rank; TP groups sum within a stage.
        assert answers == [
            (0, 0, 0, None, 2, 1.0),
            (1, 1, 0, None, 3, 1.0),
            (2, 0, 1, 0, None, 5.0),
            (3, 1, 1, 1, None, 5.0),
        ]
        group.send([3], "ping")
        assert group.recv(3, timeout_s=30) == "ping"
        group.send([0], "hang")  # rank 0 is stuck for good
        group.send([1], "raise")
        with pytest.raises(WorkerFailedError, match="worker 1 raised.*boom from the worker"):
            group.recv(2, timeout_s=30)
        with pytest.raises(WorkerFailedError, match="must be shut down"):
            group.send([2], "ping")
    finally:
        group.shutdown(timeout_s=5)
    assert not any(p.is_alive() for p in group.processes)


def test_killed_worker_is_detected():
    group = WorkerGroup(LaunchConfig(tp_size=2, timeout_s=60), _echo_ranks)
    try:
        group.gather(timeout_s=60)
        os.kill(group.processes[1].pid, signal.SIGKILL)
        with pytest.raises(WorkerFailedError, match="worker 1 (exited|closed)"):
            group.recv(0, timeout_s=30)  # rank 0 never answers: the death must end the wait
    finally:
        group.shutdown(timeout_s=5)
    assert not any(p.is_alive() for p in group.processes)


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="tp_size must be an int >= 1, got 0"):
        LaunchConfig(tp_size=0)


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="4 CUDA devices are visible")
def test_more_ranks_than_cuda_devices_rejected_before_spawning():
    message = r"= 4 ranks need CUDA devices 0\.\.3, but \d+ are visible"
    with pytest.raises(ValueError, match=message):
        WorkerGroup(LaunchConfig(tp_size=2, pp_size=2, device="cuda"), _echo_ranks)

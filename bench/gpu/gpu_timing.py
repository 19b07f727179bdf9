"""GPU timing for the kernel benchmarks (BENCHMARKS.md, "GPU timing"): CUDA events around
each run, L2 flushed before it, median of the runs after a warm-up, optional CUDA graph
for short kernels; and the two ceilings every number is read against, measured in the same
process (a >= 1 GiB device-to-device copy and a large bf16 matmul)."""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

L2_FLUSH_BYTES = 512 << 20  # >= 256 MB and ~8x the H200's 60 MB L2


class Timer:
    """Times GPU work on the current stream; one instance keeps one flush buffer."""

    def __init__(self, reps: int = 30, warmup: int = 5) -> None:
        self.reps = reps
        self.warmup = warmup
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def median_ms(self, fn: Callable[[], object], *, graph: bool = False) -> float:
        """Median milliseconds of `fn` with a cold L2. With `graph`, `fn` is captured once
        and its replay is timed (no launch gaps, for kernels of a few microseconds)."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        run = fn
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph, stream=torch.cuda.current_stream()):
                fn()
            run = cuda_graph.replay
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends, strict=True):
            # The flush runs while the host queues the timed call, so it also hides the
            # host's launch overhead from the events.
            self.flush_buffer.zero_()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_gbs(timer: Timer, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(timer: Timer, n: int = 8192) -> float:
    """bf16 matmul rate on random data (TFLOP/s)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timer.median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; NaN anywhere counts as an infinite error."""
    out, ref = out.float(), ref.float()
    err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
    return math.inf if math.isnan(err) else err


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, object]:
    """Provenance of a result: date, commit, GPU, driver, versions, command."""
    root = Path(__file__).resolve().parents[2]
    props = torch.cuda.get_device_properties(0)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "gpu": {
            "name": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        },
    }

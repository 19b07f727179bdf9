"""The session's 2-node Ray cluster (`fake_cluster.py`, its own process group, killed by
the finalizer) and the driver's connection to it. Every test here has a hard timeout
(pytest-timeout): the failure mode of a cluster is a hang."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="tests/cluster need ray (requirements/cluster.txt)")

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
NUM_CPUS_PER_NODE = 4
"""Logical CPUs per fake node (Ray accounting only: both nodes share this machine)."""
START_TIMEOUT_S = 60.0


class FakeCluster:
    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="drt-ray-")
        # UCX_TLS=tcp: on one host UCX would pick cma, not the network path between nodes.
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=self.temp_dir, UCX_TLS="tcp")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fake_cluster.py")),
             str(NUM_CPUS_PER_NODE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.address = self._expect("address", START_TIMEOUT_S)
        self.removed: set[str] = set()

    def _expect(self, word: str, timeout_s: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"fake cluster exited (status {self.proc.poll()})")
                if line.startswith(word):
                    return line.split(" ", 1)[1].strip()
        raise TimeoutError(f"fake cluster: no {word!r} line within {timeout_s} s")

    def remove_node(self, ip: str) -> None:
        """Kills node `ip` at once (SIGKILL, no drain: a lost machine); tests after this one
        get it back (`_nodes_back`)."""
        self.command(f"remove {ip}")
        self.removed.add(ip)

    def command(self, line: str, timeout_s: float = 30.0) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        self._expect("ok", timeout_s)

    def kill(self) -> None:
        """Graceful quit (about 1.5 s), then SIGKILL to the whole process group."""
        with contextlib.suppress(Exception):  # it may be hung or dead: killpg below
            self.command("quit", 15.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # session logs, sockets


@pytest.fixture(scope="session")
def fake_cluster(request):
    cluster = FakeCluster()
    request.addfinalizer(cluster.kill)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        address=cluster.address, _node_ip_address=HEAD_IP, log_to_driver=False,
        logging_level="WARNING",
    )  # fmt: skip
    request.addfinalizer(ray.shutdown)  # runs before cluster.kill (finalizers are LIFO)
    return cluster


@pytest.fixture(autouse=True)
def _nodes_back(request):
    """Re-adds a node an earlier test killed, only when a later test uses the cluster (the
    node-loss test runs last in file order: then nothing is re-added)."""
    if "fake_cluster" in request.fixturenames:
        cluster = request.getfixturevalue("fake_cluster")
        for ip in sorted(cluster.removed):
            cluster.command(f"add {ip}")
            cluster.removed.discard(ip)


MAX_TOKENS = 16


@pytest.fixture(scope="session")
def single_machine() -> dict[str, list[int]]:
    """Greedy tokens of `PROMPTS` from one colocated engine in this process: what every
    cluster run must produce."""
    from distserve_rt.engine.llm_engine import LLMEngine
    from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy

    engine = LLMEngine(engine_config())
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy(MAX_TOKENS))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return outputs

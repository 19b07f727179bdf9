"""`drt-run serve --placement FILE --launcher ray`: the file's nodes are where the
instances run (prefill TP=2 packed on node 0, decode on node 1), and a file the cluster
cannot hold is refused in one line before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distserve_rt.engine.controller import Controller
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser
from tests.cluster.conftest import HEAD_IP, WORKER_IP
from tests.engine.disagg_helpers import PROMPTS, greedy

pytestmark = pytest.mark.timeout(90)


def _write(tmp_path, nodes: dict, num_nodes: int = 2):
    path = tmp_path / "placement.yaml"
    raw = {
        "model": "llama-tiny", "placement": "disaggregated",
        "prefill": {"tp": 2, "pp": 1, "num_instances": 1},
        "decode": {"tp": 1, "pp": 1, "num_instances": 1},
        "cluster": {"num_nodes": num_nodes, "devices_per_node": 4},
        "nodes": nodes,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    return path


def _serve_argv(path, address) -> list[str]:
    return [
        "serve", "--placement", str(path), "--launcher", "ray", "--ray-address", address,
        "--placement-timeout-s", "20", "--kv-cache-memory-bytes", "8M",
        "--max-model-len", "256", "--block-size", "8",
    ]  # fmt: skip


def test_serve_runs_the_files_nodes(tmp_path, fake_cluster):
    path = _write(tmp_path, {"prefill": [0], "decode": [1]})
    args = build_parser().parse_args(_serve_argv(path, fake_cluster.address))
    config, placement, disagg = engine_args.configs_from_args(args)
    assert disagg.launcher == "ray" and disagg.instance_nodes == (0, 1)
    with Controller(config, placement, disagg) as c:
        prefill, decode = c.instances
        assert (prefill.node_ip, prefill.spec.num_ranks) == (HEAD_IP, 2)
        assert prefill.group.pg.bundle_count == 2  # both ranks reserved on node 0
        assert decode.node_ip == WORKER_IP
        for i, p in enumerate(PROMPTS[:2]):
            c.add_request(str(i), p, greedy(4))
        outputs = {}
        while c.has_unfinished_requests():
            outputs.update({o.request_id: o for o in c.step(0.05) if o.finished})
        assert all(len(o.outputs[0].token_ids) == 4 for o in outputs.values())


def test_serve_refuses_a_file_the_cluster_cannot_hold(tmp_path, fake_cluster):
    path = _write(tmp_path, {"prefill": [0], "decode": [2]}, num_nodes=3)
    proc = subprocess.run(
        [sys.executable, "-m", "distserve_rt.entrypoints.cli",
         *_serve_argv(path, fake_cluster.address)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "names node 2; the cluster has 2" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr

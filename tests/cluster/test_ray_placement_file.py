"""`drt-run serve --placement FILE --launcher ray`: the file's nodes are where the
instances run (prefill TP=2 packed on node 0, decode on node 1), and a file the cluster
cannot hold is refused in one line before anything starts."""

from __future__ import annotations

import pytest
import yaml

from distserve_rt.engine.controller import Controller
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser, main
from tests.cluster.conftest import HEAD_IP, MAX_TOKENS, WORKER_IP
from tests.engine.disagg_helpers import PROMPTS, run, settle

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


def test_serve_runs_the_files_nodes(tmp_path, fake_cluster, single_machine):
    path = _write(tmp_path, {"prefill": [0], "decode": [1]})
    args = build_parser().parse_args(_serve_argv(path, fake_cluster.address))
    config, placement, disagg = engine_args.configs_from_args(args)
    assert disagg.launcher == "ray" and disagg.instance_nodes == (0, 1)
    with Controller(config, placement, disagg) as c:
        prefill, decode = c.instances
        assert (prefill.node_ip, prefill.spec.num_ranks) == (HEAD_IP, 2)
        assert prefill.group.pg.bundle_count == 2  # both ranks reserved on node 0
        assert decode.node_ip == WORKER_IP
        assert (prefill.spec.transport, decode.spec.transport) == ("nixl", "nixl")
        outputs = run(c, max_tokens=MAX_TOKENS)
        # TP=2 prefill, KV pulled across nodes: the tokens of one TP=1 engine on one machine.
        assert {k: o.outputs[0].token_ids for k, o in outputs.items()} == single_machine
        # The counters come with the instances' periodic reports: wait for the last one.
        settle(c, lambda: c.stats().transfers.num_transfers >= len(PROMPTS))
        totals = c.stats().transfers
        assert totals.transport == "nixl" and totals.num_failures == 0
        assert totals.num_transfers == len(PROMPTS)


def test_serve_refuses_a_file_the_cluster_cannot_hold(tmp_path, fake_cluster, capsys):
    path = _write(tmp_path, {"prefill": [0], "decode": [2]}, num_nodes=3)
    with pytest.raises(SystemExit) as e:  # main's one line, no traceback
        main(_serve_argv(path, fake_cluster.address))
    assert "names node 2; the cluster has 2" in str(e.value) and "\n" not in str(e.value)

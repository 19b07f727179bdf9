"""Placement files name the node of each instance (`nodes`): plan packs whole instances
onto nodes, prefill first, or aligns Algorithm-2 pairs spanning nodes stage by stage; a
file naming nodes the placement or cluster does not have is refused in one line."""

from __future__ import annotations

import pytest

from distserve_rt.planner.placement_file import (
    PhasePlacement,
    PlacementFile,
    assign_nodes,
    placement_from_dict,
)


def test_assign_nodes_packs_whole_instances_prefill_first():
    nodes = assign_nodes(PhasePlacement(4, 1, 3), PhasePlacement(2, 1, 2), devices_per_node=8)
    assert nodes == {"prefill": [0, 0, 1], "decode": [1, 1]}
    assert assign_nodes(PhasePlacement(16, 1, 1), None, devices_per_node=8) == {}


def test_assign_nodes_aligns_pairs_spanning_nodes():
    """Algorithm 2 over 2 nodes: node j of a pair group holds the same layers (stages
    j * pp / 2 ..) of its prefill and its decode instances; a pair puts 2 x 2 + 1 x 4 / 2
    = 4 devices on each node, so 2 pairs share a group of two 8-device nodes."""
    nodes = assign_nodes(PhasePlacement(2, 2, 3), PhasePlacement(1, 4, 3), 8, 2)
    assert nodes == {
        "prefill": [[0, 1], [0, 1], [2, 3]],
        "decode": [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]],
    }
    with pytest.raises(ValueError, match="as many decode instances as prefill ones"):
        assign_nodes(PhasePlacement(2, 2, 2), PhasePlacement(1, 2, 1), 8, 2)
    with pytest.raises(ValueError, match="pp divisible by 2"):
        assign_nodes(PhasePlacement(2, 2, 1), PhasePlacement(1, 3, 1), 8, 2)
    with pytest.raises(ValueError, match="puts 10 devices on each of its 2 nodes"):
        assign_nodes(PhasePlacement(8, 2, 1), PhasePlacement(2, 2, 1), 8, 2)


def _file(**kw) -> dict:
    raw = {
        "model": "llama-tiny", "placement": "disaggregated",
        "prefill": {"tp": 2, "pp": 1, "num_instances": 1},
        "decode": {"tp": 1, "pp": 1, "num_instances": 2},
        "cluster": {"num_nodes": 2, "devices_per_node": 4},
    }  # fmt: skip
    return raw | kw


def test_nodes_round_trip_and_instance_order():
    pf = placement_from_dict(_file(nodes={"prefill": [0], "decode": [1, 0]}))
    assert pf.instance_nodes == (0, 1, 0)
    assert placement_from_dict(pf.to_dict()) == pf
    assert placement_from_dict(_file()).instance_nodes is None
    assert "nodes" not in placement_from_dict(_file()).to_dict()


def test_an_instance_may_list_a_node_per_stage():
    raw = _file(prefill={"tp": 1, "pp": 2, "num_instances": 1})
    pf = placement_from_dict(raw | {"nodes": {"prefill": [[0, 1]], "decode": [1, 0]}})
    assert pf.instance_nodes == ((0, 1), 1, 0)
    assert placement_from_dict(pf.to_dict()) == pf
    with pytest.raises(ValueError, match=r"\[0, 1, 1\] lists 3 stage nodes; the phase has pp=2"):
        placement_from_dict(raw | {"nodes": {"prefill": [[0, 1, 1]], "decode": [1, 0]}})


@pytest.mark.parametrize(
    ("nodes", "match"),
    [
        ({"prefill": [[-1]], "decode": [1, 1]}, "ints >= 0, got -1"),
        ({"prefill": [0]}, "nodes must map each phase"),
        ({"prefill": [0], "decode": [1]}, r"nodes.decode must list 2 node indices, got \[1\]"),
        ({"prefill": [0], "decode": [1, -1]}, "ints >= 0, got -1"),
        ({"prefill": [2], "decode": [1, 1]}, "names node 2; the cluster has num_nodes=2"),
    ],
)
def test_bad_nodes_refused_in_one_line(nodes, match):
    with pytest.raises(ValueError, match=match) as e:
        placement_from_dict(_file(nodes=nodes))
    assert "\n" not in str(e.value)


def test_colocated_file_nodes():
    raw = _file(placement="colocated", decode=None, nodes={"prefill": [0]})
    assert PlacementFile(**{**placement_from_dict(raw).__dict__}).instance_nodes == (0,)


def test_launcher_ray_refuses_a_colocated_placement():
    from distserve_rt.entrypoints import engine_args
    from distserve_rt.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "--launcher", "ray"])
    with pytest.raises(NotImplementedError, match="--launcher ray runs disaggregated"):
        engine_args.configs_from_args(args)

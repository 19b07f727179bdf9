"""plan_kv_pulls: for every prefill/decode TP x PP pair, the pulls rebuild each decode
rank's part of the KV exactly (checked with the reference copy on a logical KV tensor)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from distserve_rt.distributed.parallel_state import partition_layers
from distserve_rt.transfer.descriptor import PoolGeometry, describe_pool
from distserve_rt.transfer.fake import reference_transfer
from distserve_rt.transfer.reslice import Parallelism, kv_head_range, plan_kv_pulls

NUM_LAYERS, NUM_KV_HEADS = 5, 4
CONFIGS = [Parallelism(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 3)]


def _rank_part(full: torch.Tensor, par: Parallelism, tp_rank: int, pp_rank: int):
    l0, l1 = partition_layers(NUM_LAYERS, par.pp_size)[pp_rank]
    h0, nh = kv_head_range(NUM_KV_HEADS, par.tp_size, tp_rank)
    return full[:, l0:l1, :, h0 : h0 + nh].contiguous()


@pytest.mark.parametrize(
    ("src", "dst"), [(s, d) for s, d in itertools.product(CONFIGS, CONFIGS) if s != d]
)
def test_pulls_rebuild_every_decode_rank(src, dst):
    full = torch.randn(3, NUM_LAYERS, 2, NUM_KV_HEADS, 8, 4)  # [blocks, L, 2, H, bs, D]
    mapping = np.array([[0, 2], [1, 0], [2, 1]])
    for dst_tp, dst_pp in itertools.product(range(dst.tp_size), range(dst.pp_size)):
        expected = _rank_part(full, dst, dst_tp, dst_pp)[mapping[:, 0]][np.argsort(mapping[:, 1])]
        dst_pool = torch.full_like(_rank_part(full, dst, dst_tp, dst_pp), float("nan"))
        for pull in plan_kv_pulls(NUM_LAYERS, NUM_KV_HEADS, src, dst, dst_tp, dst_pp):
            src_pool = _rank_part(full, src, pull.src_tp_rank, pull.src_pp_rank)
            desc = describe_pool(src_pool, transport="fake", handle="x", offset_bytes=0,
                                 region_bytes=1)  # fmt: skip
            slice_args = pull.kv_slice.resolve(desc, PoolGeometry.of(dst_pool))
            reference_transfer(src_pool, dst_pool, mapping, slice_args)
        assert torch.equal(dst_pool, expected)  # NaN anywhere: a (layer, head) was missed


def test_tp1_to_tp2_pulls_half_the_heads():
    pulls = plan_kv_pulls(4, 8, Parallelism(1, 1), Parallelism(2, 1), dst_tp_rank=1, dst_pp_rank=0)
    assert len(pulls) == 1 and pulls[0].kv_slice.src_head_start == 4
    assert pulls[0].kv_slice.num_heads == 4


def test_kv_head_range_rules():
    assert kv_head_range(8, 2, 1) == (4, 4)
    assert kv_head_range(2, 8, 5) == (1, 1)  # replicated on 4 ranks each
    with pytest.raises(ValueError, match="tp_size 3 must divide num_kv_heads 8"):
        kv_head_range(8, 3, 0)
    with pytest.raises(ValueError, match="tp_size"):
        Parallelism(0, 1)

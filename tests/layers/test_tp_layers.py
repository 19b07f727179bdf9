"""TP sharding of the linear and embedding layers, checked in one process: the shards of
all ranks, combined the way the collectives would, equal the unsharded layer."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.distributed import ParallelContext
from distserve_rt.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distserve_rt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from distserve_rt.layers.rotary import RotaryEmbedding, inv_frequencies
from distserve_rt.layers.weight_utils import WeightShapeError

TP = 2
KW = dict(dtype=torch.float32, device="cpu")


def _ctx(rank: int, tp: int = TP) -> ParallelContext:
    # No collective is called below: the group is only required to exist.
    return ParallelContext(tp_size=tp, tp_rank=rank, tp_group=None if tp == 1 else object())


def _load(layer, **tensors) -> None:
    for pname, value in tensors.items():
        param = getattr(layer, pname)
        param.weight_loader(param, value)


def test_column_parallel_shards_concatenate(generator):
    w, b = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    x = torch.randn(3, 4, generator=generator)
    outs = []
    for rank in range(TP):
        layer = ColumnParallelLinear(4, 6, bias=True, parallel=_ctx(rank), **KW)
        _load(layer, weight=w, bias=b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), x @ w.T + b)


def test_row_parallel_partial_sums_add_up(generator):
    w = torch.randn(5, 8, generator=generator)
    x = torch.randn(3, 8, generator=generator)
    total = torch.zeros(3, 5)
    for rank in range(TP):
        layer = RowParallelLinear(8, 5, bias=False, parallel=_ctx(rank), reduce_results=False, **KW)
        _load(layer, weight=w)
        total += layer(x[:, rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(total, x @ w.T)


def test_qkv_rank_holds_its_heads(generator):
    head_dim, hidden = 2, 8
    q = torch.randn(4 * head_dim, hidden, generator=generator)
    k = torch.randn(2 * head_dim, hidden, generator=generator)
    v = torch.randn(2 * head_dim, hidden, generator=generator)
    for rank in range(TP):
        layer = QKVParallelLinear(hidden, head_dim, 4, 2, bias=False, parallel=_ctx(rank), **KW)
        for shard, tensor in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, tensor, shard)
        expected = torch.cat([t.chunk(TP)[rank] for t in (q, k, v)])
        torch.testing.assert_close(layer.weight, expected)
        assert (layer.q_size, layer.kv_size) == (2 * head_dim, head_dim)


def test_merged_column_and_shape_errors(generator):
    gate, up = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    layer = MergedColumnParallelLinear(3, (4, 4), bias=False, parallel=_ctx(1), **KW)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    torch.testing.assert_close(layer.weight, torch.cat([gate[2:], up[2:]]))
    with pytest.raises(WeightShapeError, match=r"expected \(4, 3\), got \(4, 2\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(4, 2), 0)
    with pytest.raises(ValueError, match="shard_id must be in"):
        layer.weight.weight_loader(layer.weight, gate, 2)


def test_vocab_shards_pad_the_last_rank(generator):
    """vocab 7 over TP=2: 4 rows per rank, the last row of rank 1 is zero padding."""
    table = torch.randn(7, 3, generator=generator)
    hidden = torch.randn(2, 3, generator=generator)
    ids = torch.tensor([0, 3, 4, 6])
    looked_up, logits = torch.zeros(4, 3), []
    for rank in range(TP):
        embed = VocabParallelEmbedding(7, 3, parallel=_ctx(rank), **KW)
        _load(embed, weight=table)
        local = ids - embed.vocab_start  # what forward does before its all-reduce
        mine = (local >= 0) & (local < embed.num_embeddings_per_rank)
        looked_up[mine] = embed.weight[local[mine]]
        head = ParallelLMHead(7, 3, parallel=_ctx(rank), shared_weight=embed.weight, **KW)
        logits.append(hidden @ head.weight.T)
    torch.testing.assert_close(looked_up, table[ids])
    assert torch.equal(embed.weight[-1], torch.zeros(3))
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :7], hidden @ table.T)


def test_lm_head_tp1_logits_are_float32(generator):
    head = ParallelLMHead(5, 4, parallel=_ctx(0, 1), dtype=torch.bfloat16, device="cpu")
    _load(head, weight=torch.randn(5, 4, generator=generator))
    assert head.compute_logits(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_rope_rejects_unknown_types_and_rotates_pairs():
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        RotaryEmbedding(8, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3 rope_scaling lacks"):
        inv_frequencies(8, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    rope = RotaryEmbedding(4, 10000.0)
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    # Position 0 is the identity; rotation keeps each (i, i + d/2) pair's norm.
    # Clones: on CPU the rotation is in place.
    out0, _ = rope(torch.tensor([0]), q.clone(), q.clone())
    torch.testing.assert_close(out0, q)
    out5, _ = rope(torch.tensor([5]), q.clone(), q.clone())
    torch.testing.assert_close(out5[0, 0, 0] ** 2 + out5[0, 0, 2] ** 2, torch.tensor(1.0))
    assert not torch.allclose(out5, q)

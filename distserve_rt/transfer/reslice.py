"""Which slices a decode rank pulls from which prefill ranks when the two instances use
different parallelism (DistServe lets each phase pick its own TP and PP).

Each rank's pool holds only its part of the model's KV: the layers of its pipeline stage
(``partition_layers``) and the KV heads of its tensor-parallel rank (`kv_head_range`). A
decode rank's part overlaps one or more prefill ranks' parts; `plan_kv_pulls` lists one
`KVPull` per overlap, with the `KVSlice` in each pool's local layer and head indices.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.distributed.parallel_state import partition_layers
from distserve_rt.transfer.descriptor import KVSlice


@dataclass(frozen=True, slots=True)
class KVPull:
    """One transfer of a decode rank: from prefill rank (src_tp_rank, src_pp_rank)."""

    src_tp_rank: int
    src_pp_rank: int
    kv_slice: KVSlice


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(first head, num heads)`` of KV heads held by `tp_rank`.

    TP splits KV heads evenly when ``num_kv_heads % tp_size == 0``; with more ranks than KV
    heads (``tp_size % num_kv_heads == 0``) each head is replicated on ``tp_size //
    num_kv_heads`` consecutive ranks (vLLM's rule). Other combinations are an error.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
    if num_kv_heads % tp_size == 0:
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, per_rank
    if tp_size % num_kv_heads == 0:
        return tp_rank // (tp_size // num_kv_heads), 1
    raise ValueError(
        f"tp_size {tp_size} must divide num_kv_heads {num_kv_heads} or be a multiple of it"
    )


def plan_kv_pulls(
    num_layers: int,
    num_kv_heads: int,
    src: Parallelism,
    dst: Parallelism,
    dst_tp_rank: int,
    dst_pp_rank: int,
) -> list[KVPull]:
    """The pulls that fill decode rank (dst_tp_rank, dst_pp_rank)'s pool from the prefill
    instance's ranks: every (layer, head) it holds comes from exactly one pull. A head
    replicated on several prefill ranks is pulled from the first of them."""
    if not 0 <= dst_pp_rank < dst.pp_size:
        raise ValueError(f"dst_pp_rank must be in [0, {dst.pp_size}), got {dst_pp_rank}")
    dst_l0, dst_l1 = partition_layers(num_layers, dst.pp_size)[dst_pp_rank]
    dst_h0, dst_nh = kv_head_range(num_kv_heads, dst.tp_size, dst_tp_rank)
    pulls = []
    for src_pp_rank, (src_l0, src_l1) in enumerate(partition_layers(num_layers, src.pp_size)):
        l0, l1 = max(dst_l0, src_l0), min(dst_l1, src_l1)
        if l0 >= l1:
            continue
        covered = set()
        for src_tp_rank in range(src.tp_size):
            src_h0, src_nh = kv_head_range(num_kv_heads, src.tp_size, src_tp_rank)
            h0, h1 = max(dst_h0, src_h0), min(dst_h0 + dst_nh, src_h0 + src_nh)
            if h0 >= h1 or (h0, h1) in covered:  # no overlap, or a replica already pulled
                continue
            covered.add((h0, h1))
            kv_slice = KVSlice(
                src_layer_start=l0 - src_l0, dst_layer_start=l0 - dst_l0, num_layers=l1 - l0,
                src_head_start=h0 - src_h0, dst_head_start=h0 - dst_h0, num_heads=h1 - h0,
            )  # fmt: skip
            pulls.append(KVPull(src_tp_rank, src_pp_rank, kv_slice))
    return pulls

"""The per-pair transport: one pool exported through shm and nixl, each peer read through
the transport chosen for its pair (and the transfer labelled with it), nothing else; and
descriptors chosen per (decode rank, prefill rank) pair."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.core.kv_cache import KVCacheSpec
from distserve_rt.transfer import PoolDescriptor, TransferStatus, create_transport
from distserve_rt.transfer.per_pair import (
    PoolDescriptorSet,
    descriptors_for_rank,
    select_descriptor,
    select_rank_descriptors,
)
from tests.transfer.peer_process import ucx_over_tcp

pytest.importorskip("nixl_cu12", reason="the nixl transport needs nixl-cu12")

SPEC = KVCacheSpec(num_blocks=4, num_layers=2, num_kv_heads=2, head_dim=8, block_size=8)


@pytest.fixture(scope="module", autouse=True)
def _tcp():
    with ucx_over_tcp():
        yield


@pytest.mark.parametrize("chosen", ["shm", "nixl"])
def test_each_pair_reads_through_its_transport(chosen):
    producer, consumer = create_transport("shm+nixl"), create_transport("shm+nixl")
    try:
        src = producer.allocate_pool(SPEC)
        src.copy_(torch.randn(SPEC.shape))
        raw = producer.register_pool(src).to_bytes()
        assert [d.transport for d in PoolDescriptorSet.from_bytes(raw).descriptors] == [
            "shm",
            "nixl",
        ]
        peer = consumer.open_peer(PoolDescriptor.from_bytes(select_descriptor(raw, chosen)))
        dst = consumer.allocate_pool(SPEC)
        handle = consumer.submit(peer, dst, [2, 0], [1, 3])
        assert handle.wait(10.0) is TransferStatus.SUCCESS, handle.error
        assert handle.transport.name == chosen  # the transfer names the path it took
        assert torch.equal(dst[1], src[2]) and torch.equal(dst[3], src[0])
        by_name = consumer.stats_by_transport()
        assert by_name[chosen].num_succeeded == 1 and consumer.stats().num_succeeded == 1
    finally:
        consumer.close()
        producer.close()


def test_unexported_transport_refused():
    shm = create_transport("shm")
    try:
        raw = shm.register_pool(shm.allocate_pool(SPEC)).to_bytes()
        assert select_descriptor(raw, "shm") == raw
        with pytest.raises(ValueError, match=r"'nixl' chosen for a pair.*\['shm'\] only"):
            select_descriptor(raw, "nixl")
        pair = create_transport("shm+nixl")
        with pytest.raises(ValueError, match="exported through 'cuda_ipc'"):
            d = PoolDescriptor.from_bytes(raw)
            pair.open_peer(PoolDescriptor(**{**_fields(d), "transport": "cuda_ipc"}))
        pair.close()
    finally:
        shm.close()


def _fields(d: PoolDescriptor) -> dict:
    return {name: getattr(d, name) for name in d.__slots__}


def test_descriptors_selected_per_rank_pair():
    """[decode rank][prefill rank] transports pick each pair's descriptor from the prefill
    ranks' announced sets (None: not sent); a row of the wrong length is refused."""
    shm = create_transport("shm")
    try:
        d = PoolDescriptor.from_bytes(shm.register_pool(shm.allocate_pool(SPEC)).to_bytes())
        both = PoolDescriptorSet((d, PoolDescriptor(**{**_fields(d), "transport": "nixl"})))
        raws = [both.to_bytes(), both.to_bytes()]
        chosen = select_rank_descriptors(raws, [("shm", None), ("nixl", "shm")])
        names = [
            [r and PoolDescriptor.from_bytes(r).transport for r in row] for row in chosen.by_rank
        ]
        assert names == [["shm", None], ["nixl", "shm"]]
        assert descriptors_for_rank(chosen, 1) == list(chosen.by_rank[1])
        assert descriptors_for_rank(raws, 5) == raws  # one choice for every rank
        with pytest.raises(
            ValueError, match="chosen for 1 prefill ranks, the prefill instance announced 2"
        ):
            select_rank_descriptors(raws, [("shm",)])
    finally:
        shm.close()

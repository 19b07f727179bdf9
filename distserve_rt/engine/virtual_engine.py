"""Virtual engines: how a pipeline-parallel instance keeps several batches in flight.

A pipeline of k stages idles k - 1 stages when one batch is in flight. As vLLM v0 does, an
engine with ``pipeline_parallel_size = k`` keeps k virtual engines, each with its own
scheduler and block manager over a disjoint share of the KV pool: virtual engine v owns
block ids ``[v * n, (v + 1) * n)`` of the workers' pools (``n = num_blocks // k``); its
scheduler counts from 0 and the executor adds ``block_offset = v * n`` when it ships the
step. A request stays on the virtual engine it was assigned to (the least loaded one), and
a virtual engine schedules its next batch only when its previous one came back, so the
scheduler contract (a decode is scheduled after its previous token is appended) holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_rt.core.block_manager import BlockManager, BlockManagerStats
from distserve_rt.core.scheduler import Scheduler, SchedulerConfig, make_scheduler


@dataclass(slots=True)
class VirtualEngine:
    """One scheduler over one share of the KV pool."""

    index: int
    scheduler: Scheduler
    block_manager: BlockManager
    block_offset: int
    """Added to every block id of this virtual engine's steps."""
    busy: bool = False
    """A step of this virtual engine is in flight."""

    @property
    def num_live_requests(self) -> int:
        return self.scheduler.num_waiting + self.scheduler.num_running


def make_virtual_engines(
    num_virtual_engines: int,
    num_blocks: int,
    block_size: int,
    watermark: float,
    policy: str,
    scheduler_config: SchedulerConfig,
    enable_prefix_caching: bool = False,
) -> list[VirtualEngine]:
    """``num_virtual_engines`` schedulers, each over ``num_blocks // num_virtual_engines``
    blocks (the remainder is unused). ValueError when a share would hold no block."""
    share = num_blocks // num_virtual_engines
    if share < 1:
        raise ValueError(
            f"{num_blocks} KV blocks cannot be shared by {num_virtual_engines} virtual engines "
            "(pipeline_parallel_size); raise kv_cache_memory_bytes"
        )
    engines = []
    for index in range(num_virtual_engines):
        block_manager = BlockManager(share, block_size, watermark, enable_prefix_caching)
        scheduler = make_scheduler(policy, scheduler_config, block_manager)
        engines.append(VirtualEngine(index, scheduler, block_manager, index * share))
    return engines


def least_loaded(engines: list[VirtualEngine]) -> VirtualEngine:
    """The virtual engine with the fewest live requests (the first on ties)."""
    return min(engines, key=lambda ve: ve.num_live_requests)


def combined_kv_stats(engines: list[VirtualEngine]) -> BlockManagerStats:
    """The pool as one: blocks and requests summed over the virtual engines."""
    stats = [ve.block_manager.stats() for ve in engines]
    num_blocks = sum(s.num_blocks for s in stats)
    num_used = sum(s.num_used_blocks for s in stats)
    return BlockManagerStats(
        num_blocks=num_blocks,
        num_free_blocks=sum(s.num_free_blocks for s in stats),
        num_used_blocks=num_used,
        usage=num_used / num_blocks,
        num_requests=sum(s.num_requests for s in stats),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
    )

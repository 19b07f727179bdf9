"""The pull protocol of a TP x PP decode instance, in one process: `RankPuller` (the decode
instance's side) drives two `RankPulls` (the TP = 2 ranks' side) through a stand-in for
`MultiprocExecutor.broadcast`, over `fake` transports whose clock the test moves.

The prefill instance is TP = PP = 1 here, so each decode rank pulls half the heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distserve_rt.core.request import Request
from distserve_rt.engine.disagg.kv_migration import PullGeometry
from distserve_rt.engine.disagg.messages import Migrate
from distserve_rt.engine.disagg.puller import PULL_TIMEOUT_S, PullOutcome
from distserve_rt.engine.disagg.rank_kv import (
    ExportKVCommand,
    RankPuller,
    RankPulls,
)
from distserve_rt.engine.protocol import TransferTotals
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.transfer import Parallelism
from distserve_rt.transfer.fake import FakeTransport
from distserve_rt.transfer.per_pair import RankDescriptors

NUM_LAYERS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM = 2, 2, 4, 8
TRANSFER_S = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class InProcessRanks:
    """`MultiprocExecutor.broadcast` over `RankPulls` objects (rank order) in this process."""

    def __init__(self, ranks: list[RankPulls], pools: list[torch.Tensor]) -> None:
        self.ranks, self.pools = ranks, pools
        self.num_broadcasts = 0

    def broadcast(self, command: object) -> list:
        self.num_broadcasts += 1
        return [r.answer(command, pool) for r, pool in zip(self.ranks, self.pools, strict=True)]


@pytest.fixture
def setup():
    clock = Clock()
    prefill = FakeTransport(clock=clock)
    src_pool = torch.randn(4, NUM_LAYERS, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    descriptor = prefill.register_pool(src_pool).to_bytes()
    transports = [FakeTransport(transfer_delay_s=TRANSFER_S, clock=clock) for _ in range(2)]
    ranks = [RankPulls(t, tp_rank, 0) for tp_rank, t in enumerate(transports)]
    pools = [torch.zeros(4, NUM_LAYERS, 2, 1, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    executor = InProcessRanks(ranks, pools)
    geometry = PullGeometry(NUM_LAYERS, NUM_KV_HEADS, Parallelism(1, 1), Parallelism(2, 1))
    puller = RankPuller(executor, geometry, "fake")  # type: ignore[arg-type]
    puller.open_peers({0: [descriptor]})
    yield clock, src_pool, transports, ranks, pools, executor, puller
    prefill.close()


def _migration(request_id: str = "r", src_blocks=(2, 0), prefill_index: int = 0):
    request = Request(request_id, 0, [1, 2, 3], SamplingParams(), 0.0, 64)
    migration = Migrate(request_id, prefill_index, list(src_blocks), [1, 2, 3, 4], 3,
                        SamplingParams(), 0.0)  # fmt: skip
    return request, migration


def test_start_returns_at_once_and_the_pull_is_reported_when_every_rank_is_done(setup):
    clock, src_pool, _, _, pools, executor, puller = setup
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    assert list(puller.pulls) == ["r"]  # in flight: start did not wait for the copies
    clock.now = TRANSFER_S / 2
    assert puller.poll(clock.now) == [] and list(puller.pulls) == ["r"]
    clock.now = TRANSFER_S
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.SUCCESS and done.end_time == TRANSFER_S
    num_bytes = 2 * NUM_LAYERS * 2 * NUM_KV_HEADS * BLOCK_SIZE * HEAD_DIM * 4  # 2 blocks fp32
    assert done.num_bytes == num_bytes
    for head, pool in enumerate(pools):  # each rank holds its head of blocks 2 and 0
        assert torch.equal(pool[[1, 3]], src_pool[[2, 0]][:, :, :, head : head + 1])
    assert not puller.pulls and puller.poll(clock.now) == []
    assert puller.totals() == TransferTotals("fake", 1, 0, num_bytes, TRANSFER_S)
    num_broadcasts = executor.num_broadcasts
    puller.poll(clock.now)  # nothing in flight: no round trip to the ranks
    assert executor.num_broadcasts == num_broadcasts


def test_one_rank_failing_fails_the_migration_once_every_rank_is_final(setup):
    clock, _, transports, _, _, _, puller = setup
    transports[1].inject_failures(1, "rank 1 lost its peer")
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    clock.now = TRANSFER_S
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.FAILED and "rank 1 lost its peer" in done.error
    assert puller.totals() == TransferTotals("fake", 0, 1, 0, 0.0)


def test_a_rank_that_cannot_submit_answers_at_once_and_the_others_are_awaited(setup):
    clock, _, _, ranks, _, _, puller = setup
    ranks[0]._peers.clear()  # rank 0 never got the prefill pool's descriptor
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    assert puller.poll(clock.now) == []  # rank 1's copy still writes its blocks
    clock.now = TRANSFER_S
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.FAILED and "no pool descriptor for prefill-0" in done.error


def test_a_rank_pull_past_the_timeout_times_out_and_the_ranks_keep_polling_it(setup):
    clock, _, transports, ranks, _, executor, puller = setup
    assert puller.timeout_s == PULL_TIMEOUT_S
    for t in transports:
        t.transfer_delay_s = 10 * PULL_TIMEOUT_S
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    clock.now = float(np.nextafter(PULL_TIMEOUT_S, 0.0))
    assert puller.poll(clock.now) == []  # not before the timeout
    clock.now = PULL_TIMEOUT_S
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.TIMED_OUT
    assert f"not done after {PULL_TIMEOUT_S}" in done.error and done.end_time == PULL_TIMEOUT_S
    assert puller.totals() == TransferTotals("fake", 0, 1, 0, 0.0)
    # The ranks' copies cannot be cancelled: they stay in flight and are polled until final.
    assert list(puller.pulls) == [request.request_id]
    assert [r.num_in_flight for r in ranks] == [1, 1]
    clock.now = 10 * PULL_TIMEOUT_S
    (final,) = puller.poll(clock.now)
    assert final.pull is done.pull and final.outcome is PullOutcome.SUCCESS
    assert [r.num_in_flight for r in ranks] == [0, 0] and not puller.pulls
    assert puller.totals() == TransferTotals("fake", 0, 1, 0, 0.0)  # counted once
    num_broadcasts = executor.num_broadcasts
    puller.poll(clock.now)  # nothing left in flight: no round trip
    assert executor.num_broadcasts == num_broadcasts


def test_pulls_of_several_requests_finish_independently(setup):
    clock, _, _, _, _, _, puller = setup
    first = _migration("a", (0,))
    puller.start(*first, np.array([0], np.int32), clock.now)
    clock.now = 0.5
    second = _migration("b", (1,))
    puller.start(*second, np.array([2], np.int32), clock.now)
    clock.now = TRANSFER_S
    assert [d.pull.request.request_id for d in puller.poll(clock.now)] == ["a"]
    clock.now = 0.5 + TRANSFER_S
    assert [d.pull.request.request_id for d in puller.poll(clock.now)] == ["b"]
    with pytest.raises(ValueError, match="not a pull command"):
        RankPulls(FakeTransport(), 0, 0).answer(ExportKVCommand(), torch.zeros(1))


def test_a_submit_that_raises_fails_only_its_migration(setup):
    clock, _, _, _, _, _, puller = setup
    bad = _migration("bad", (99,))  # the prefill pool has 4 blocks
    puller.start(*bad, np.array([0], np.int32), clock.now)  # the rank answers, not raises
    good = _migration("good", (1,))
    puller.start(*good, np.array([2], np.int32), clock.now)
    clock.now = TRANSFER_S
    done = {d.pull.request.request_id: d for d in puller.poll(clock.now)}
    assert done["bad"].outcome is PullOutcome.FAILED and "could not submit" in done["bad"].error
    assert done["good"].outcome is PullOutcome.SUCCESS


def test_a_pull_that_finished_is_a_success_even_when_polled_after_the_timeout(setup):
    clock, _, _, _, _, _, puller = setup
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    clock.now = PULL_TIMEOUT_S + 1.0  # the loop was busy: the copy ended long ago
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.SUCCESS


def test_descriptors_chosen_per_rank_pair_each_rank_opens_its_row():
    """Prefill PP=2 -> decode PP=2 with a descriptor per (decode rank, prefill rank) pair
    (`RankDescriptors`, as the ray launcher sends them): rank k opens prefill rank k alone
    (the same layers) and pulls it; a pull that needs a pool its row left out is refused,
    never sent another way."""
    clock = Clock()
    prefill = FakeTransport(clock=clock)
    src = [torch.randn(4, 1, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM) for _ in range(2)]
    raws = [prefill.register_pool(pool).to_bytes() for pool in src]
    transports = [FakeTransport(clock=clock) for _ in range(2)]
    ranks = [RankPulls(t, 0, pp_rank) for pp_rank, t in enumerate(transports)]
    pools = [torch.zeros_like(pool) for pool in src]
    geometry = PullGeometry(NUM_LAYERS, NUM_KV_HEADS, Parallelism(1, 2), Parallelism(1, 2))
    puller = RankPuller(InProcessRanks(ranks, pools), geometry, "fake")  # type: ignore[arg-type]
    puller.open_peers({0: RankDescriptors(((raws[0], None), (None, raws[1])))})
    assert [[p is None for p in r._peers[0]] for r in ranks] == [[False, True], [True, False]]
    request, migration = _migration()
    puller.start(request, migration, np.array([1, 3], np.int32), clock.now)
    (done,) = puller.poll(clock.now)
    assert done.outcome is PullOutcome.SUCCESS, done.error
    for stage in range(2):
        assert torch.equal(pools[stage][[1, 3]], src[stage][[2, 0]])
    ranks[0].open_peers({0: RankDescriptors(((None, raws[1]), (None, raws[1])))}, geometry)
    error = ranks[0].submit(pools[0], 7, 0, [2], np.array([1], np.int32))
    assert "prefill rank 0's pool was not opened here" in error
    with pytest.raises(ValueError, match="decode rank 2 has no descriptors"):
        RankDescriptors(((raws[0], None), (None, raws[1]))).for_rank(2)
    prefill.close()

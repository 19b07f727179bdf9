"""The scheduler-driven simulators: exact timestamps on hand-computed cases, agreement with
the fast simulators without memory pressure, and what only they model (preemption)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.planner.instance_timing import Link, PipelineTiming
from distserve_rt.planner.latency_model import ConstantLatencyModel, LatencyModel
from distserve_rt.planner.simulator import (
    ColocatedSimulator,
    DisaggregatedSimulator,
    DisaggSpec,
    KVTransferSpec,
    SchedulerDrivenColocated,
    SchedulerDrivenDisaggregated,
    SimInstanceSpec,
)
from distserve_rt.workloads import arrival_times

PREFILL_S, DECODE_S = 0.1, 0.01
CONST = SimInstanceSpec(
    ConstantLatencyModel(PREFILL_S, DECODE_S), 10_000, max_batch_tokens=2048, max_num_seqs=64
)
BIG_KV = 10**7


@dataclass(frozen=True)
class AffineLatency(LatencyModel):
    """Step times that depend on the batch shape, like a fitted profile (s)."""

    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return 0.01 + 1e-4 * num_tokens + 1e-8 * sum_sq_lens

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return 0.005 + 1e-4 * batch_size, 1e-7


def _workload(n: int, rate: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    return arrival_times(n, rate, seed=seed), rng.integers(8, 400, n), rng.integers(1, 120, n)


# ---- (a) exact timestamps -----------------------------------------------------------------


def test_continuous_batching_exact_timestamps():
    # r0 prefills alone [0, .1]; r1 arrived at .05, so the next step is its prefill
    # [.1, .2] (prefill first); then both decode [.2, .21] (r1's last token) and r0 alone
    # [.21, .22].
    res = SchedulerDrivenColocated(CONST, "continuous_batching").run([0, 0.05], [10, 20], [3, 2])
    np.testing.assert_allclose(res.prefill_start, [0, 0.1])
    np.testing.assert_allclose(res.prefill_end, [0.1, 0.2])
    np.testing.assert_allclose(res.decode_start, [0.2, 0.2])  # r0 waited for r1's prefill
    np.testing.assert_allclose(res.finish, [0.22, 0.21])


def test_chunked_prefill_exact_timestamps():
    # The step at .1 mixes r0's decode with r1's whole prompt (ConstantLatency: .1); then
    # one decode step for both.
    res = SchedulerDrivenColocated(CONST, "chunked_prefill").run([0, 0.05], [10, 20], [3, 2])
    np.testing.assert_allclose(res.prefill_end, [0.1, 0.2])
    np.testing.assert_allclose(res.decode_start, [0.1, 0.2])
    np.testing.assert_allclose(res.finish, [0.21, 0.21])


def test_chunked_prefill_splits_a_prompt_at_the_budget():
    spec = replace(CONST, max_batch_tokens=8, max_num_seqs=8)
    res = SchedulerDrivenColocated(spec, "chunked_prefill").run([0], [20], [2])
    # 20 tokens in chunks of 8, 8, 4: three prefill steps, then one decode.
    assert res.prefill_end[0] == pytest.approx(3 * PREFILL_S)
    assert res.finish[0] == pytest.approx(3 * PREFILL_S + DECODE_S)


def test_disaggregated_exact_timestamps():
    spec = DisaggSpec(CONST, CONST, kv_transfer=KVTransferSpec(seconds_per_token=0.001))
    res = SchedulerDrivenDisaggregated(spec).run([0, 0.05, 0.05], [10, 20, 5], [3, 2, 1])
    # r0: prefill [0, .1], pull 10 tokens [.1, .11], decodes [.11, .12] [.12, .13].
    # r1, r2 prefill together [.1, .2]; r2's one token ends it there; r1 pulls [.2, .22].
    np.testing.assert_allclose(res.prefill_start, [0, 0.1, 0.1])
    np.testing.assert_allclose(res.prefill_end, [0.1, 0.2, 0.2])
    np.testing.assert_allclose(res.transfer_start, [0.1, 0.2, 0.2])
    np.testing.assert_allclose(res.transfer_end, [0.11, 0.22, 0.2])
    np.testing.assert_allclose(res.decode_start, [0.11, 0.22, 0.2])
    np.testing.assert_allclose(res.finish, [0.13, 0.23, 0.2])


def test_prefill_dispatch_counts_queued_tokens_not_requests():
    spec = DisaggSpec(CONST, CONST, num_prefill=2)
    res = SchedulerDrivenDisaggregated(spec).run([0, 0.01, 0.02], [100, 10, 10], [2, 2, 2])
    # r2 sees P0 with 100 queued tokens and P1 with 10: it queues behind r1 on P1 (a rule
    # counting requests would tie and pick P0, which frees at .1).
    np.testing.assert_allclose(res.prefill_start, [0, 0.01, 0.11])


def test_decode_dispatch_spreads_requests_over_decode_instances():
    spec = DisaggSpec(
        CONST, CONST, num_decode=2, kv_transfer=KVTransferSpec(seconds_per_token=0.001)
    )
    res = SchedulerDrivenDisaggregated(spec).run([0, 0], [10, 10], [2, 2])
    # One prefill batch; r0 goes to D0, r1 to D1 (fewest assigned), so the pulls overlap
    # instead of queueing on one inbound link.
    np.testing.assert_allclose(res.transfer_start, [0.1, 0.1])
    np.testing.assert_allclose(res.transfer_end, [0.11, 0.11])


# ---- (b) agreement with the fast simulators without memory pressure ----------------------


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_colocated_matches_the_fast_simulator_without_memory_pressure(policy):
    budget = 512 if policy == "chunked_prefill" else 1024
    spec = SimInstanceSpec(AffineLatency(), BIG_KV, max_batch_tokens=budget, max_num_seqs=128)
    arrival, prompt, out = _workload(300, rate=8.0)
    fast = ColocatedSimulator(spec, policy).run(arrival, prompt, out)
    driven = SchedulerDrivenColocated(spec, policy).run(arrival, prompt, out)
    # Same policy, same batches: the same times, up to float summation order.
    np.testing.assert_allclose(driven.prefill_end, fast.prefill_end, rtol=1e-9)
    np.testing.assert_allclose(driven.finish, fast.finish, rtol=1e-9)


def test_disaggregated_matches_the_fast_simulator_without_memory_pressure():
    inst = SimInstanceSpec(AffineLatency(), BIG_KV, max_batch_tokens=512, max_num_seqs=128)
    spec = DisaggSpec(inst, inst, kv_transfer=KVTransferSpec(1e-5, 1e-3))
    arrival, prompt, out = _workload(300, rate=8.0)
    fast = DisaggregatedSimulator(spec).run(arrival, prompt, out)
    driven = SchedulerDrivenDisaggregated(spec).run(arrival, prompt, out)
    np.testing.assert_allclose(driven.prefill_end, fast.prefill_end, rtol=1e-9)
    # One systematic difference: the runtime's decode instance admits migrations at the
    # start of its steps (`DecodeInstance.step`), the fast simulator the moment the prefill
    # ends; so a pull may start up to one decode step later, and TPOT is a little longer.
    lag = driven.transfer_start - fast.transfer_start
    assert (lag >= -1e-12).all() and lag.max() < 0.05
    assert lag.mean() > 0
    assert driven.tpot.mean() == pytest.approx(fast.tpot.mean(), rel=0.02)
    assert driven.tpot.mean() >= fast.tpot.mean()


# ---- (c) memory pressure: what only the runtime's policies do ------------------------------


def test_under_memory_pressure_the_runtime_policy_admits_early_and_preempts():
    # 8 blocks of 16 tokens. Each request needs 16 + 48 = 64 tokens (4 blocks) at the end.
    # The fast simulator reserves prompt + output: two requests at a time, never preempts.
    # The runtime admits on the prompt (1 block each): all four start at once, and when
    # their growth needs more than 8 blocks the latest arrival is preempted by recompute.
    spec = SimInstanceSpec(ConstantLatencyModel(PREFILL_S, DECODE_S), 128, max_batch_tokens=2048)
    arrival, prompt, out = [0, 0, 0, 0], [16] * 4, [48] * 4
    fast = ColocatedSimulator(spec, "continuous_batching").run(arrival, prompt, out)
    sim = SchedulerDrivenColocated(spec, "continuous_batching")
    driven = sim.run(arrival, prompt, out)
    np.testing.assert_allclose(fast.prefill_end, [0.1, 0.1, 0.6 + 0.1, 0.6 + 0.1], atol=0.05)
    np.testing.assert_allclose(driven.prefill_end, [0.1] * 4)  # all admitted at once
    assert sim.num_preemptions > 0
    assert np.isfinite(driven.finish).all()
    assert sim.block_manager.num_free_blocks == sim.block_manager.num_blocks
    sim.block_manager.check_invariants()


def test_a_request_that_never_fits_fails_instead_of_hanging():
    spec = replace(CONST, kv_capacity_tokens=64)
    res = SchedulerDrivenColocated(spec, "chunked_prefill").run([0, 0], [40, 100], [4, 4])
    assert np.isfinite(res.finish[0])
    assert res.prefill_end[1] == np.inf and res.finish[1] == np.inf
    dis = SchedulerDrivenDisaggregated(DisaggSpec(spec, spec)).run([0, 0], [40, 100], [4, 4])
    assert np.isfinite(dis.finish[0]) and dis.finish[1] == np.inf


@pytest.mark.parametrize("policy", ["continuous_batching", "chunked_prefill"])
def test_a_request_whose_output_outgrows_the_pool_fails_and_frees_its_blocks(policy):
    # The prompt fits (admitted on the prompt), the output does not: it is preempted, and
    # its recompute can never be admitted, so the scheduler rejects it (FINISHED_ERROR).
    spec = replace(CONST, kv_capacity_tokens=64)
    sim = SchedulerDrivenColocated(spec, policy)
    res = sim.run([0, 0], [8, 40], [4, 40])
    assert np.isfinite(res.finish[0]) and res.finish[1] == np.inf
    assert sim.num_preemptions >= 1
    assert sim.block_manager.num_free_blocks == sim.block_manager.num_blocks


def test_a_prompt_that_fits_prefill_but_not_decode_fails_and_releases_the_prefill_kv():
    dec = replace(CONST, kv_capacity_tokens=64)
    sim = SchedulerDrivenDisaggregated(DisaggSpec(CONST, dec))
    res = sim.run([0, 0], [8, 100], [4, 4])
    assert np.isfinite(res.finish[0]) and res.finish[1] == np.inf
    for bm in sim.block_managers:
        assert bm.num_free_blocks == bm.num_blocks


# ---- (d) disaggregated: blocks conserved, everything finishes ------------------------------


def test_disaggregated_under_pressure_conserves_blocks_and_finishes_everything():
    pre = SimInstanceSpec(AffineLatency(), 2048, max_batch_tokens=512, max_num_seqs=64)
    dec = replace(pre, kv_capacity_tokens=1024)
    spec = DisaggSpec(pre, dec, num_prefill=2, num_decode=2, kv_transfer=KVTransferSpec(1e-5))
    arrival, prompt, out = _workload(150, rate=30.0, seed=3)
    sim = SchedulerDrivenDisaggregated(spec)
    res = sim.run(arrival, prompt, out)
    assert np.isfinite(res.finish).all()
    assert sim.num_preemptions > 0  # the decode pools were short
    for bm in sim.block_managers:
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks
    # Every stage in order for every request.
    stages = [res.arrival, res.prefill_start, res.prefill_end, res.transfer_start]
    stages += [res.transfer_end, res.decode_start, res.finish]
    for a, b in zip(stages, stages[1:], strict=False):
        assert (b >= a - 1e-12).all()


# ---- (e) step-time noise -------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormalNoise:
    sigma: float = 0.3

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.lognormal(-(self.sigma**2) / 2, self.sigma))


def _noisy(seed: int, noise=LogNormalNoise()):
    arrival, prompt, out = _workload(40, rate=8.0)
    spec = SimInstanceSpec(AffineLatency(), BIG_KV, max_batch_tokens=512)
    return SchedulerDrivenColocated(spec, "chunked_prefill", noise=noise, seed=seed).run(
        arrival, prompt, out
    )


def test_noise_changes_times_and_a_seed_reproduces_them():
    plain, a, b, c = _noisy(0, None), _noisy(0), _noisy(0), _noisy(1)
    assert not np.allclose(a.finish, plain.finish)
    np.testing.assert_array_equal(a.finish, b.finish)
    assert not np.allclose(a.finish, c.finish)
    # Mean factor 1: the noisy run's mean TPOT stays near the deterministic one.
    assert a.tpot.mean() == pytest.approx(plain.tpot.mean(), rel=0.2)


def test_correlated_noise_gives_slow_stretches_that_do_not_average_out():
    from distserve_rt.planner.step_noise import StepTimeNoise

    table = tuple(np.exp(np.linspace(-0.6, 0.6, 21)))
    independent, correlated = StepTimeNoise(table), StepTimeNoise(table, 0.98)
    runs = [_noisy(seed, correlated) for seed in range(4)]
    # Each run (each instance's clock) starts a fresh process: a seed reproduces its run.
    np.testing.assert_array_equal(_noisy(0, correlated).finish, runs[0].finish)
    spread_corr = np.mean([r.tpot.std() for r in runs])
    spread_ind = np.mean([_noisy(seed, independent).tpot.std() for seed in range(4)])
    # A request's decode steps share a slow or fast stretch: their mean varies more.
    assert spread_corr > 1.5 * spread_ind


def test_noise_that_returns_a_bad_factor_is_refused():
    class Zero:
        def sample(self, rng):
            return 0.0

    with pytest.raises(ValueError, match="noise.sample must return a finite factor > 0"):
        _noisy(0, Zero())


# ---- refusals ------------------------------------------------------------------------------


def test_pipeline_parallel_instances_are_refused_with_the_reason():
    pp2 = SimInstanceSpec(
        ConstantLatencyModel(PREFILL_S, DECODE_S),
        1000,
        parallelism=Parallelism(1, 2),
        pipeline=PipelineTiming(2, hidden_size=1, link=Link(1e30, 0.0)),
    )
    with pytest.raises(NotImplementedError, match="pp=1 only.*use the fast simulator"):
        SchedulerDrivenDisaggregated(DisaggSpec(CONST, pp2))
    with pytest.raises(NotImplementedError, match="pp=1 only"):
        SchedulerDrivenColocated(pp2, "continuous_batching")


def test_continuous_batching_refuses_a_budget_below_the_context_like_the_runtime():
    spec = replace(CONST, max_batch_tokens=64)
    with pytest.raises(ValueError, match=r"max_batch_tokens \(64\) must be >= max_model_len"):
        SchedulerDrivenColocated(spec, "continuous_batching").run([0], [60], [10])


@pytest.mark.parametrize("seed", range(4))
def test_random_tight_pools_never_stall_and_conserve_blocks(seed):
    # Random lengths against pools of a few requests' worth: every request finishes, or
    # fails (inf) when it can never fit; every block comes back.
    rng = np.random.default_rng(seed)
    n = 60
    arrival = np.cumsum(rng.exponential(0.02, n))
    prompt, out = rng.integers(1, 200, n), rng.integers(1, 150, n)
    kv = int(rng.integers(128, 512))
    inst = SimInstanceSpec(AffineLatency(), kv, max_batch_tokens=256, max_num_seqs=16)
    for policy in ("continuous_batching", "chunked_prefill"):
        spec = replace(inst, max_batch_tokens=512) if policy == "continuous_batching" else inst
        sim = SchedulerDrivenColocated(spec, policy)
        res = sim.run(arrival, prompt, out)
        assert (np.isfinite(res.finish) == np.isfinite(res.prefill_end)).all()
        assert np.isfinite(res.finish).any()
        assert sim.block_manager.num_free_blocks == sim.block_manager.num_blocks
    dis = SchedulerDrivenDisaggregated(DisaggSpec(inst, inst, num_prefill=2, num_decode=2))
    res = dis.run(arrival, prompt, out)
    assert np.isfinite(res.finish).any()
    for bm in dis.block_managers:
        assert bm.num_free_blocks == bm.num_blocks


def test_kind_noise_draws_each_step_from_its_own_kinds_distribution():
    """A profile's noise per step kind: prefill steps scaled by the prefill table, decode
    steps by the decode one (a prefill tail must not slow simulated decodes)."""
    from distserve_rt.planner.step_noise import KindNoise, StepTimeNoise

    noise = KindNoise(
        {"prefill": StepTimeNoise((3.0, 3.0)), "decode": StepTimeNoise((0.5, 0.5))},
        StepTimeNoise((100.0, 100.0)),
    )
    spec = replace(CONST, max_batch_tokens=2048)
    arrival, prompt, out = np.array([0.0]), np.array([16]), np.array([5])
    got = SchedulerDrivenColocated(spec, "continuous_batching", noise=noise).run(
        arrival, prompt, out
    )
    assert got.ttft[0] == pytest.approx(3.0 * PREFILL_S)
    assert got.tpot[0] == pytest.approx(0.5 * DECODE_S)
    # A kind the profile has no table for (mixed steps here) draws from the fallback.
    assert noise.for_kind("mixed").quantiles == (100.0, 100.0)
    # Correlated tables keep one process per kind and instance: a seed reproduces a run.
    correlated = KindNoise({"decode": StepTimeNoise((0.5, 1.5), 0.9)}, StepTimeNoise((1.0, 1.0)))
    np.testing.assert_array_equal(_noisy(3, correlated).finish, _noisy(3, correlated).finish)

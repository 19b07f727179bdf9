"""What is compared: a `Target` is one deployment both sides run, its setup (the engine's
settings and the simulator's spec, from one set of numbers) and the simulator that predicts
it. The simulator is a plain function ``simulate(setup, latency, arrival, workload, noise,
seed)``: by default the scheduler-driven simulators (core's own schedulers on a simulated
clock, step times drawn from the profile's noise), or the fast ones (``SIMULATORS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from distserve_rt.benchmarks.sim_vs_runtime.latencies import RunLatencies
from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.simulator import (
    ColocatedPolicy,
    ColocatedSimulator,
    DisaggregatedSimulator,
    DisaggSpec,
    KVTransferSpec,
    ProcessHops,
    SimInstanceSpec,
    SimResult,
)
from distserve_rt.planner.simulator.driven_colocated import SchedulerDrivenColocated
from distserve_rt.planner.simulator.driven_disaggregated import SchedulerDrivenDisaggregated
from distserve_rt.planner.simulator.driven_instance import StepNoise
from distserve_rt.workloads.workload import Workload


@dataclass(frozen=True)
class ColocatedSetup:
    """One colocated instance, as the engine and the simulator both see it."""

    policy: ColocatedPolicy
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int
    """KV the engine's pool holds (the simulator reserves prompt + output of it)."""
    model: str = "dummy:llama-tiny"
    block_size: int = 16
    loop_s: float = 0.0
    """The engine's loop between two busy steps (s), which no step's record holds: the
    driven simulator adds it to each step (`Calibration.engine_loop_s`)."""

    threads_per_instance = None
    """Threads the engine's one process uses: the harness's own setting (None)."""

    def engine_config(self, bytes_per_token: int) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            policy=self.policy.value,
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_capacity_tokens * bytes_per_token,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            log_stats_interval_s=0.0,
            # The simulator does not model prefix-cache hits (yet): neither may the engine.
            enable_prefix_caching=False,
        )

    def make_engine(self, bytes_per_token: int, model=None) -> EngineCore:
        """The engine in this process (``model``: reuse already-loaded weights)."""
        from distserve_rt.engine.llm_engine import LLMEngine

        return LLMEngine(self.engine_config(bytes_per_token), model=model)

    def instance_spec(self, latency: LatencyModel) -> SimInstanceSpec:
        return SimInstanceSpec(
            latency,
            self.kv_capacity_tokens,
            max_batch_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
        )

    def describe(self) -> dict[str, object]:
        return {**vars(self), "policy": self.policy.value, "placement": "colocated"}


@dataclass(frozen=True)
class DisaggSetup:
    """1 prefill + 1 decode instance (``drt-run serve --placement disaggregated``), each in
    its own process pinned to one core and running one thread (two instances share a 2-core
    machine without oversubscribing it), as the engine and the simulator both see it."""

    max_num_batched_tokens: int
    """The prefill budget L_m."""
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int
    """KV each instance's pool holds."""
    kv_transfer: KVTransferSpec = field(default_factory=KVTransferSpec)
    model: str = "dummy:llama-tiny"
    block_size: int = 16
    hops: ProcessHops = field(default_factory=ProcessHops)
    """Time between the processes (`calibration.measure_hops` on the idle runtime)."""

    threads_per_instance = 1
    """`PhaseConfig.cpu_cores` default: the profile and the drift probe must use the same."""

    def engine_config(self, bytes_per_token: int) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            block_size=self.block_size,
            kv_cache_memory_bytes=self.kv_capacity_tokens * bytes_per_token,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            log_stats_interval_s=0.0,
            # The simulator does not model prefix-cache hits (yet): neither may the engine.
            enable_prefix_caching=False,
        )

    def make_engine(self, bytes_per_token: int, model=None, **disagg) -> EngineCore:
        """The `Controller` and its two instance processes (``model`` is unused: each
        instance loads its own; ``disagg``: `DisaggConfig` fields, e.g. tests' launcher)."""
        from distserve_rt.engine.controller import Controller  # spawns processes

        config = self.engine_config(bytes_per_token)
        return Controller(config, Placement.disaggregated(), DisaggConfig(**disagg))

    def spec(self, latency: LatencyModel) -> DisaggSpec:
        prefill = SimInstanceSpec(
            latency,
            self.kv_capacity_tokens,
            max_batch_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
        )
        decode = SimInstanceSpec(latency, self.kv_capacity_tokens, max_num_seqs=self.max_num_seqs)
        return DisaggSpec(prefill, decode, kv_transfer=self.kv_transfer, hops=self.hops)

    def describe(self) -> dict[str, object]:
        return {
            **{k: v for k, v in vars(self).items() if k not in ("kv_transfer", "hops")},
            "kv_transfer": vars(self.kv_transfer),
            "hops": vars(self.hops),
            "placement": "disaggregated 1P1D",
        }


Setup = ColocatedSetup | DisaggSetup
Wake = Callable[[float], float]
SimulateFn = Callable[..., RunLatencies]
"""``simulate(setup, latency, arrival, workload, noise=None, seed=0, wake=None)``: arrival
``[n]`` s, non-decreasing; each step's time times ``noise.sample`` (None: the model's mean
step) from a generator seeded with ``seed``, plus ``wake(idle_s)`` after an idle instance."""


def simulate_colocated(
    setup: ColocatedSetup,
    latency: LatencyModel,
    arrival: np.ndarray,
    workload: Workload,
    noise: StepNoise | None = None,
    seed: int = 0,
    wake: Wake | None = None,
) -> RunLatencies:
    """The fast colocated simulator (deterministic, no wake-up cost or loop: noise and wake
    must be None, ``setup.loop_s`` 0)."""
    _check_driven_only(noise, wake)
    if setup.loop_s:
        raise ValueError(
            f"loop_s must be 0 for the fast simulator (it has no loop between steps), got "
            f"{setup.loop_s!r}; use simulator 'driven'"
        )
    result = ColocatedSimulator(setup.instance_spec(latency), setup.policy).run(
        arrival, workload.prompt_lens, workload.output_lens
    )
    return _run_latencies(result, arrival)


def simulate_disaggregated(
    setup: DisaggSetup,
    latency: LatencyModel,
    arrival: np.ndarray,
    workload: Workload,
    noise: StepNoise | None = None,
    seed: int = 0,
    wake: Wake | None = None,
) -> RunLatencies:
    """DistServe's fast disaggregated simulator (deterministic, no wake-up cost)."""
    _check_driven_only(noise, wake)
    result = DisaggregatedSimulator(setup.spec(latency)).run(
        arrival, workload.prompt_lens, workload.output_lens
    )
    return _with_breakdown(result, arrival)


def simulate_colocated_driven(
    setup: ColocatedSetup,
    latency: LatencyModel,
    arrival: np.ndarray,
    workload: Workload,
    noise: StepNoise | None = None,
    seed: int = 0,
    wake: Wake | None = None,
) -> RunLatencies:
    """The engine's own scheduler of ``setup.policy`` on a simulated clock."""
    sim = SchedulerDrivenColocated(
        setup.instance_spec(latency),
        setup.policy,
        block_size=setup.block_size,
        max_model_len=setup.max_model_len,
        noise=noise,
        seed=seed,
        wake=wake,
        loop_s=setup.loop_s,
    )
    return _run_latencies(sim.run(arrival, workload.prompt_lens, workload.output_lens), arrival)


def simulate_disaggregated_driven(
    setup: DisaggSetup,
    latency: LatencyModel,
    arrival: np.ndarray,
    workload: Workload,
    noise: StepNoise | None = None,
    seed: int = 0,
    wake: Wake | None = None,
) -> RunLatencies:
    """The instances' own prefill and decode schedulers on a simulated clock."""
    sim = SchedulerDrivenDisaggregated(
        setup.spec(latency),
        block_size=setup.block_size,
        max_model_len=setup.max_model_len,
        noise=noise,
        seed=seed,
        wake=wake,
    )
    result = sim.run(arrival, workload.prompt_lens, workload.output_lens)
    return _with_breakdown(result, arrival)


def _check_driven_only(noise: StepNoise | None, wake: Wake | None) -> None:
    if noise is not None:
        raise ValueError(
            f"noise must be None for the fast simulators (they are deterministic), got "
            f"{noise!r}; use simulator 'driven' for step-time noise"
        )
    if wake is not None:
        raise ValueError(
            f"wake must be None for the fast simulators (no idle-instance cost), got "
            f"{wake!r}; use simulator 'driven'"
        )


def _with_breakdown(result: SimResult, arrival: np.ndarray) -> RunLatencies:
    run = _run_latencies(result, arrival)
    # The same stages the runtime's breakdown reports, to compare where the time goes.
    run.extra.update({f"mean_{k}_ms": 1e3 * v for k, v in result.mean_breakdown().items()})
    return run


def _run_latencies(result: SimResult, arrival: np.ndarray) -> RunLatencies:
    finish = result.finish[np.isfinite(result.finish)]
    end = float(finish.max()) if finish.size else float(arrival.max())
    return RunLatencies(result.ttft, result.tpot, end - float(arrival.min()), {})


@dataclass(frozen=True)
class Target:
    """One deployment to compare: ``name`` labels its rows and curve."""

    name: str
    setup: Setup
    simulate: SimulateFn

    @property
    def threads(self) -> int | None:
        """Threads per instance the runtime uses (None: the harness's ``--threads``)."""
        return self.setup.threads_per_instance


SIMULATORS: dict[str, tuple[SimulateFn, SimulateFn]] = {
    "driven": (simulate_colocated_driven, simulate_disaggregated_driven),
    "fast": (simulate_colocated, simulate_disaggregated),
}
"""Simulator name -> (colocated, disaggregated) functions."""


def default_simulator(setup: Setup, simulator: str = "driven") -> SimulateFn:
    """The ``simulator`` (a `SIMULATORS` name) function for ``setup``'s placement."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {sorted(SIMULATORS)}, got {simulator!r}")
    colocated, disaggregated = SIMULATORS[simulator]
    return colocated if isinstance(setup, ColocatedSetup) else disaggregated

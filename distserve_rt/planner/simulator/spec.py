"""What the simulator runs: instance specs (latency model, parallelism, memory, batching)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.planner.instance_timing import PipelineTiming
from distserve_rt.planner.latency_model import LatencyModel


class SimMode(str, Enum):
    """Which phases a disaggregated run simulates.

    ``prefill_only``/``decode_only`` are the paper's Algorithm 1 building blocks: a prefill
    instance scored on TTFT alone, a decode instance (prompts arrive already prefilled, KV
    ready) scored on TPOT alone.
    """

    FULL = "full"
    PREFILL_ONLY = "prefill_only"
    DECODE_ONLY = "decode_only"


@dataclass(frozen=True)
class StepOverhead:
    """Host time of one step on top of the model's: ``base_s + per_token_s × context tokens``.

    Charged once per step, on the first pipeline stage (it schedules the batch and launches
    it; later stages only receive activations). Context tokens are the tokens the batch
    attends over before the step: a prefill batch's Σ prompt, a decode step's Σ ctx.
    """

    base_s: float = 0.0
    per_token_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.per_token_s >= 0):
            raise ValueError(
                f"step overhead must be >= 0, got base_s={self.base_s!r} "
                f"per_token_s={self.per_token_s!r}"
            )

    def seconds(self, num_ctx_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_ctx_tokens

    def decode_affine(self, batch_size: int, alpha: float, beta: float) -> tuple[float, float]:
        """A decode step's ``(alpha, beta)`` (over Σ(ctx+1)) with the overhead added: its
        Σ ctx is Σ(ctx+1) − batch_size, so the step stays affine in Σ(ctx+1)."""
        k = self.per_token_s
        return alpha + self.base_s - k * batch_size, beta + k


@dataclass(frozen=True)
class SimInstanceSpec:
    """One instance (TP × PP devices) of one phase, or a colocated one."""

    latency: LatencyModel
    """Whole-model step times on ``tp_size`` devices (one stage's share is 1/pp_size of it)."""
    kv_capacity_tokens: int
    """KV tokens the instance holds (all its devices together)."""
    parallelism: Parallelism = Parallelism()
    """The instance's TP x PP; ``tp_size`` must be the latency model's ``tp``."""
    pipeline: PipelineTiming | None = None
    """Hops between stages; required when pp_size > 1."""
    max_batch_tokens: int = 512
    """Prefill: L_m, the prompt-token budget of one batch (a longer prompt runs alone).
    Colocated: the per-step token budget (vLLM's max_num_batched_tokens, or the chunk
    budget of chunked prefill)."""
    max_num_seqs: int = 256
    """Most requests decoding at once in this instance (vLLM's max_num_seqs)."""
    step_overhead: StepOverhead = StepOverhead()
    """Host time per step (none by default: the profiles' step times include what they
    measured)."""

    def __post_init__(self) -> None:
        if not isinstance(self.step_overhead, StepOverhead):
            raise ValueError(f"step_overhead must be a StepOverhead, got {self.step_overhead!r}")
        if not isinstance(self.parallelism, Parallelism):
            raise ValueError(f"parallelism must be a Parallelism, got {self.parallelism!r}")
        par = self.parallelism
        # The step times are those of one TP degree: a mismatch would time the wrong instance.
        if par.tp_size != self.latency.tp:
            raise ValueError(
                f"parallelism.tp_size ({par.tp_size}) must equal the latency model's tp "
                f"({self.latency.tp})"
            )
        if self.pipeline is None:
            object.__setattr__(self, "pipeline", PipelineTiming(1))
        if self.pipeline.pp != par.pp_size:
            raise ValueError(
                f"pipeline.pp ({self.pipeline.pp}) must equal parallelism.pp_size ({par.pp_size})"
            )
        for key in ("kv_capacity_tokens", "max_batch_tokens", "max_num_seqs"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.parallelism.world_size


@dataclass(frozen=True)
class KVTransferSpec:
    """KV migration cost: ``latency_s + prompt tokens × seconds_per_token``."""

    seconds_per_token: float = 0.0
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.seconds_per_token < 0 or self.latency_s < 0:
            raise ValueError(
                f"KV transfer times must be >= 0, got seconds_per_token="
                f"{self.seconds_per_token!r} latency_s={self.latency_s!r}"
            )

    def seconds(self, num_tokens: int) -> float:
        return self.latency_s + num_tokens * self.seconds_per_token


@dataclass(frozen=True)
class ProcessHops:
    """Time between a disaggregated deployment's processes that no step shows (s): a
    request accepted by the controller reaches a prefill instance's queue ``dispatch_s``
    later, and a token reaches the controller ``token_s`` after the step that made it.
    Each instance's loop also runs between two of its steps (the controller's messages,
    pulls started and polled, outputs sent): ``prefill_loop_s`` / ``decode_loop_s`` per
    step, added to each step's time. Zero for the planner's GPU profiles (not measured
    there); on CPU the runtime's 1P1D measured ~1 ms per hop and 0.55 / 0.20 ms of loop per
    prefill / decode step (5% / 8% of the steps, bench/README.md). Only the
    scheduler-driven simulator models them."""

    dispatch_s: float = 0.0
    token_s: float = 0.0
    prefill_loop_s: float = 0.0
    decode_loop_s: float = 0.0

    def __post_init__(self) -> None:
        for key in ("dispatch_s", "token_s", "prefill_loop_s", "decode_loop_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{key} must be a number of seconds >= 0, got {value!r}")

    @property
    def is_zero(self) -> bool:
        return (
            self.dispatch_s == 0
            and self.token_s == 0
            and self.prefill_loop_s == 0
            and self.decode_loop_s == 0
        )


@dataclass(frozen=True)
class DisaggSpec:
    """``num_prefill`` prefill and ``num_decode`` decode instances and the KV path between."""

    prefill: SimInstanceSpec
    decode: SimInstanceSpec
    num_prefill: int = 1
    num_decode: int = 1
    kv_transfer: KVTransferSpec = KVTransferSpec()
    hops: ProcessHops = ProcessHops()

    def __post_init__(self) -> None:
        for key in ("num_prefill", "num_decode"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")

    @property
    def num_devices(self) -> int:
        return (
            self.num_prefill * self.prefill.num_devices + self.num_decode * self.decode.num_devices
        )

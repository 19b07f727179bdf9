"""DistServe's simulator's modelling choices, so our simulator can reproduce its numbers.

DistServe (OSDI'24) ships a simpy simulator (``LLMServe/DistServe``, ``simdistserve/``) that
its placement search runs. Its choices, read from its code at commit ``82831f1`` (facts, no
code carried over), differ from ours in five places; `distserve_disagg_spec` and
`distserve_colocated_spec` build our specs with its choices instead:

* **Per-step overhead** (its "ray overhead"): ``2 ms + 0.0001 ms × context tokens`` on every
  step, charged on the first pipeline stage only (`DISTSERVE_STEP_OVERHEAD`).
* **Prefill batch**: FCFS, every queued prompt while the batch stays within the instance's
  KV capacity in tokens (its ``max_num_tokens`` table, e.g. 66,144 for OPT-13B at TP 1):
  in effect unbounded, where we batch up to L_m = 512. Its prefill instance holds no KV
  back, so ours gets unbounded memory.
* **KV transfer** is free and immediate; decode admission is unbounded (no KV budget, no
  seat limit).
* **Pipeline stages**: a prefill stage takes ``t/pp + pp`` ms (whole prefill ``t + pp²``), a
  decode stage ``t/pp``; nothing is charged between stages (`PrefillStageConstant`, and a
  free link between stages).
* **Output length**: its request with ``output_len = o`` runs ``o`` decode steps after the
  prefill and its TPOT divides by ``o``; ours counts the prefill's token in the output.
  Its request ``(p, o)`` is our ``(p, o + 1)`` (`from_distserve_output_lens`).

Not modelled: its cap of 50,000 context tokens per decode step (requests over it wait a
step, round-robin). The recorded reference runs never reach it (see
``tests/planner/data/distserve_reference/README.md``); at loads where they would, the two
simulators part.

Refused (ValueError), because the two simulators would part without saying so:

* decode PP > 1: its decode stages take whatever waits at stage 0, so micro-batches merge
  and the pipeline runs half empty, where ours keeps ``pp`` balanced lanes (its TPOT came
  out ~15% higher on the PP2 reference's requests with a TP1 PP2 decode);
* more than one prefill or decode instance: its ``simulate_dist`` runs one of each, and
  its dispatch (fewest queued requests) is not ours (fewest queued tokens / least load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distserve_rt.config.parallelism import Parallelism
from distserve_rt.models.config import ModelConfig
from distserve_rt.planner.instance_timing import Link, PipelineTiming, distserve_kv_capacity
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.profiles import ProfileSet
from distserve_rt.planner.simulator.spec import (
    DisaggSpec,
    KVTransferSpec,
    SimInstanceSpec,
    StepOverhead,
)

DISTSERVE_STEP_OVERHEAD = StepOverhead(base_s=2e-3, per_token_s=1e-7)
"""2 ms + 0.0001 ms per context token, on each step's first stage."""
PREFILL_STAGE_CONSTANT_S = 1e-3
"""Each of ``pp`` prefill stages costs ``pp`` times this on top of ``t/pp``."""
UNBOUNDED = 10**9
"""KV tokens and seats where DistServe's simulator sets no limit."""
_FREE_LINK = Link(math.inf, 0.0)
"""Between pipeline stages: DistServe charges no hop (its constant is in the stage time)."""


@dataclass(frozen=True, slots=True)
class PrefillStageConstant(LatencyModel):
    """``inner`` with DistServe's prefill pipeline constant: ``pp`` stages of ``t/pp + pp``
    ms each, i.e. a whole prefill of ``t + pp²`` ms (the simulator gives each stage 1/pp of
    it). Decode steps are ``inner``'s."""

    inner: LatencyModel
    pp: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"pp must be a positive int, got {self.pp!r}")

    @property
    def tp(self) -> int:
        return self.inner.tp

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        constant_s = self.pp * self.pp * PREFILL_STAGE_CONSTANT_S
        return self.inner.prefill_s(num_tokens, sum_sq_lens) + constant_s

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return self.inner.decode_affine(batch_size)


def distserve_batch_cap(model: ModelConfig, parallelism: Parallelism) -> int:
    """The most prompt tokens DistServe's simulator puts in one prefill batch of this instance
    (its KV capacity table); ValueError if the table has no such instance."""
    cap = distserve_kv_capacity(model.name, parallelism)
    if cap is None:
        raise ValueError(
            f"DistServe's simulator has no capacity for {model.name} at "
            f"tp={parallelism.tp_size}, pp={parallelism.pp_size}; its modelling covers the "
            f"OPT-13B/66B/175B instances its max_num_tokens table lists"
        )
    return cap


def _instance(
    model: ModelConfig, parallelism: Parallelism, latency: LatencyModel
) -> SimInstanceSpec:
    pp = parallelism.pp_size
    return SimInstanceSpec(
        latency=latency,
        kv_capacity_tokens=UNBOUNDED,
        parallelism=parallelism,
        pipeline=PipelineTiming(pp, model.hidden_size, _FREE_LINK if pp > 1 else None),
        max_batch_tokens=distserve_batch_cap(model, parallelism),
        max_num_seqs=UNBOUNDED,
        step_overhead=DISTSERVE_STEP_OVERHEAD,
    )


def distserve_disagg_spec(
    model: ModelConfig,
    profile: ProfileSet,
    prefill: Parallelism,
    decode: Parallelism,
    num_prefill: int = 1,
    num_decode: int = 1,
) -> DisaggSpec:
    """One prefill and one decode instance as DistServe's simulator models them (module
    docstring), or ValueError for what it models differently."""
    if decode.pp_size != 1:
        raise ValueError(
            f"decode pp_size must be 1 with DistServe's modelling, got {decode.pp_size}: its "
            f"decode pipeline merges micro-batches, ours does not (see distserve_modelling)"
        )
    for key, value in (("num_prefill", num_prefill), ("num_decode", num_decode)):
        if value != 1:
            raise ValueError(
                f"{key} must be 1 with DistServe's modelling, got {value!r}: its simulator "
                f"runs one prefill and one decode instance"
            )
    inner = profile.latency_model(model, prefill.tp_size)
    pre = _instance(model, prefill, PrefillStageConstant(inner, prefill.pp_size))
    dec = _instance(model, decode, profile.latency_model(model, decode.tp_size))
    return DisaggSpec(pre, dec, num_prefill, num_decode, KVTransferSpec())


def distserve_colocated_spec(
    model: ModelConfig, profile: ProfileSet, parallelism: Parallelism
) -> SimInstanceSpec:
    """One colocated instance as DistServe's vLLM baseline models it: prefill first, every
    waiting prompt within its capacity in one batch (our continuous_batching policy). Its
    baseline times steps with its vLLM profile (``a100-80g-vllm``) and, like its prefill
    instances, adds the ``pp²`` ms constant (1 ms at pp = 1) to each prefill."""
    inner = profile.latency_model(model, parallelism.tp_size)
    return _instance(model, parallelism, PrefillStageConstant(inner, parallelism.pp_size))


def from_distserve_output_lens(output_lens) -> np.ndarray:
    """Output lengths of DistServe's simulator (decode steps after the prefill) as ours (the
    prefill's token included): ``o + 1``, ``[num_requests]`` int64."""
    out = np.asarray(output_lens, dtype=np.int64)
    if out.size and out.min() < 0:
        raise ValueError(f"output_lens must be >= 0, got min {out.min()}")
    return out + 1

"""The simulator's inputs measured on this machine: a latency profile per thread count the
targets run with (a colocated engine uses the harness's threads, a disaggregated instance
one, pinned to its core), the drift probe's reference next to each, the step-time noise,
and the KV transfer cost of the 1P1D path.

The default profile is measured inside a running `LLMEngine` (its step log: host overhead,
prefill, decode and chunked prefill's mixed steps, as the engine has them), not from steps
timed in isolation, which ran 1.1-1.7x faster than the engine's (issue 15)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distserve_rt.benchmarks.sim_vs_runtime.drift import DriftProbe, ProbeTimes, pinned
from distserve_rt.benchmarks.sim_vs_runtime.steps import engine_loop_s, loop_gaps_s
from distserve_rt.benchmarks.sim_vs_runtime.wake import WakePenalty, measure_wake
from distserve_rt.planner.latency_model import LatencyModel
from distserve_rt.planner.profiles import ProfileSet
from distserve_rt.planner.simulator import KVTransferSpec
from distserve_rt.planner.simulator.driven_instance import StepNoise
from distserve_rt.planner.step_timer import StepTimer


def set_threads(num_threads: int) -> None:
    """Sizes both thread pools a step uses (torch's and the native ops')."""
    import torch

    from distserve_rt import _native

    torch.set_num_threads(num_threads)
    _native.set_num_threads(num_threads)


@dataclass
class Calibration:
    """What the simulator of targets running ``threads`` threads per instance uses."""

    threads: int
    profile: ProfileSet
    latency: LatencyModel
    probe_reference: ProbeTimes
    reference_source: str
    """"measured after profiling", "profile file" (its ``measurement.drift_probe``) or
    "predicted by the profile" (a profile made elsewhere, without the probe)."""
    noise: StepNoise | None = None
    """What each simulated step's time is multiplied by (None: the model's mean step)."""
    wake: WakePenalty | None = None
    """Extra time of a step after the instance idled (None: not modelled)."""
    engine_loop_s: float = 0.0
    """A colocated engine's loop between two busy steps (s; `steps.engine_loop_s` of the
    calibration's steps), which its simulation adds to each step (`ColocatedSetup.loop_s`).
    1P1D's instances' loops are in its `ProcessHops`; 0: not modelled."""

    def describe(self, *, sequences: bool = True) -> dict[str, object]:
        """What the results record of this calibration; ``sequences`` False leaves the
        replayed noise sequences (thousands of numbers per kind) out of the embedded profile
        (the calibrations at a rate: nothing reloads them, and there are one per rate)."""
        entry = self.profile.entries[0] if self.profile.entries else None
        profile = self.profile.to_dict()
        if not sequences:
            for raw in profile["entries"]:
                raw.pop("step_noise_sequence", None)
        return {
            "threads": self.threads,
            "hardware": self.profile.hardware,
            "source": self.profile.source,
            "coefficients_ms": entry.coefficients.to_dict() if entry else None,
            "fit_error": {k: v.to_dict() for k, v in entry.fit_error.items()} if entry else {},
            "measurement_threads": self.profile.measurement.get("threads"),
            "drift_probe_reference": self.probe_reference.to_dict(),
            "drift_probe_reference_source": self.reference_source,
            **_describe_noise(self.noise),
            "wake_penalty": None if self.wake is None else self.wake.to_dict(),
            "engine_loop_ms": 1e3 * self.engine_loop_s,
            # The whole profile (samples included): --profile can reuse it after extraction.
            "profile": profile,
        }


def _describe_noise(noise) -> dict[str, object]:
    """Quantiles, autocorrelation and replayed steps of ``noise`` (the sequences themselves
    are in the embedded profile): one table, or one per step kind."""
    if noise is None:
        return {"step_noise": None, "step_noise_autocorrelation": None}
    by_kind = getattr(noise, "by_kind", None)
    if by_kind is None:
        return {
            "step_noise": getattr(noise, "quantiles", None),
            "step_noise_autocorrelation": getattr(noise, "autocorrelation", None),
            "step_noise_replayed_steps": len(getattr(noise, "sequence", ())),
        }
    kinds = {**by_kind, "all": noise.fallback}
    return {
        "step_noise": {k: list(n.quantiles) for k, n in kinds.items()},
        "step_noise_autocorrelation": {k: n.autocorrelation for k, n in kinds.items()},
        "step_noise_replayed_steps": {k: len(n.sequence) for k, n in kinds.items()},
    }


def calibrate(
    profile: ProfileSet,
    latency: LatencyModel,
    threads: int,
    probe: DriftProbe,
    timer: StepTimer | None,
) -> Calibration:
    """Pairs ``profile`` with its probe reference. ``timer``: the profile was just measured
    here, so the probe is timed now, under the same threads, and stored in the profile's
    measurement; None: the reference comes from the profile file, or from the profile's own
    prediction of the probe when the file has none (or one of other shapes)."""
    if timer is not None:
        with pinned(profile_cores(threads)):  # where the profile was measured
            reference = probe.measure(timer)
        profile.measurement["drift_probe"] = {**probe.to_dict(), **reference.to_dict()}
        return Calibration(threads, profile, latency, reference, "measured after profiling")
    stored = profile.measurement.get("drift_probe")
    if isinstance(stored, dict) and all(stored.get(k) == v for k, v in probe.to_dict().items()):
        reference = ProbeTimes(float(stored["prefill_ms"]), float(stored["decode_ms"]))
        return Calibration(threads, profile, latency, reference, "profile file")
    predicted = probe.predict(latency)
    return Calibration(threads, profile, latency, predicted, "predicted by the profile")


def profile_cores(threads: int) -> tuple[int, ...] | None:
    """The cores an engine of ``threads`` threads is pinned to while it is profiled: a
    disaggregated instance's setting (`Placement.cpu_core_groups`: the prefill instance gets the
    lowest cores), or None when ``threads`` takes every core (a colocated engine, unpinned)."""
    cores = sorted(os.sched_getaffinity(0))
    return None if threads >= len(cores) else tuple(cores[:threads])


def profile_engine(
    engine,
    workload,
    threads: int,
    *,
    repeats: int,
    hardware: str,
    progress=None,
) -> ProfileSet:
    """The latency profile of ``engine`` (an `LLMEngine` in this process) running
    ``workload`` (`EngineWorkload`) ``repeats`` times with ``threads`` threads, pinned as
    `profile_cores` says: the engine-step fit (per-step overhead, prefill, decode, mixed),
    its held-out error and the step-time noise; ``measurement.wake_penalty`` holds the cost
    of a step after idling (`wake.measure_wake`, `wake_from_profile`)."""
    cores = profile_cores(threads)
    set_threads(threads)
    with pinned(cores):
        return _profile_running(
            engine, workload, repeats, hardware, progress,
            f"sim_vs_runtime engine profile ({threads} threads)",
            {"mode": "engine", "threads": threads, "cores": None if cores is None else list(cores),
             "policy": str(engine.config.policy)},
        )  # fmt: skip


def profile_instances(
    engine, workload, *, repeats: int, hardware: str, progress=None
) -> ProfileSet:
    """The latency profile of a running 1P1D ``engine`` (a `Controller`): ``workload``
    (`EngineWorkload`) through it with its instances' step logs on, the prefill fit from
    the prefill instance's steps and the decode fit from the decode instance's, in their
    own processes and loops. The one-thread engine profiled in this process underestimated
    them by 1.06-1.44x (bench/README.md). ``measurement.wake_penalty`` is the prefill
    instance's own (`wake.measure_wake` through the controller, from its step log): the
    harness engine's left its prefills after an idle wait 1.10-1.27x slow."""
    return _profile_running(
        engine, workload, repeats, hardware, progress,
        "sim_vs_runtime 1P1D instances' own steps", {"mode": "instances", "threads": 1},
    )  # fmt: skip


def _profile_running(
    engine, workload, repeats: int, hardware: str, progress, source: str, setting: dict
) -> ProfileSet:
    """``workload`` through ``engine`` with its step log on, the wake-up cost after, and
    the fit; ``setting`` says what ran (mode, threads, ...) in the measurement."""
    from distserve_rt.benchmarks.engine_profile import record_engine_steps
    from distserve_rt.planner.profiler import fit_engine_profile

    records = record_engine_steps(engine, workload, repeats=repeats, progress=progress)
    prompt_len = (workload.min_prompt_len + workload.max_prompt_len) // 2
    wake = measure_wake(engine, prompt_len)
    kinds = [r.shape.kind for r in records]
    measurement = {
        "device": "cpu",
        **setting,
        "loop_gap_ms": _loop_gaps_ms(records, colocated=setting["mode"] == "engine"),
        "repeats": repeats,
        "includes": ["schedule", "execute", "postprocess"],
        "workload": {k: getattr(workload, k) for k in workload.__dataclass_fields__},
        "num_steps": {k: kinds.count(k) for k in ("prefill", "decode", "mixed")},
        "wake_penalty": {"prompt_len": prompt_len, **wake.to_dict()},
    }
    return fit_engine_profile(
        records, engine.model_config, hardware=hardware, source=source, measurement=measurement
    )


def calibrate_at_load(
    engine,
    cal: Calibration,
    arrival: np.ndarray,
    workload,
    *,
    rate: float,
    seed: int,
    hardware: str,
    progress=None,
) -> Calibration:
    """``cal`` refitted on ``engine``'s own steps while it serves ``workload`` (held-out
    requests: other lengths, arrivals and prompt tokens than the compared runs') at
    ``arrival`` (``rate`` req/s, the rate a run is compared at): the batch shapes, idle
    gaps and the other instance's load are those of that rate, which a closed-loop profile
    does not have (1P1D's decode steps ran 0.85-1.02x its instance profile depending on
    the rate, its prefill steps 1.06-1.26x; bench/README.md). The steps after an idle
    wait are in the fit and its noise, so no wake-up cost is added on top (``wake``
    None). The drift-probe reference stays ``cal``'s: the probe compares the machine with
    the first profile."""
    from distserve_rt.benchmarks.sim_vs_runtime.replay import replay
    from distserve_rt.planner.profiler import fit_engine_profile

    log = engine.enable_step_log(1 << 24)
    try:
        replay(engine, arrival, workload, seed=seed, progress=progress)
    finally:
        records = log.records()
        engine.disable_step_log()
    kinds = [r.shape.kind for r in records]
    colocated = not hasattr(engine, "prefills")
    loops = _loop_gaps_ms(records, colocated=colocated)
    measurement = {
        "device": "cpu",
        "mode": "at_load",
        "loop_gap_ms": loops,
        "threads": cal.threads,
        "includes": ["schedule", "execute", "postprocess"],
        "num_requests": int(workload.num_requests),
        "rate": rate,
        "seed": seed,
        "num_steps": {k: kinds.count(k) for k in ("prefill", "decode", "mixed")},
    }
    model = engine.model_config
    # Chunked prefill at a rate runs almost no prefill-only steps: that kind keeps the
    # profile's form, scaled to the few it ran (`fit_engine_steps`' fallback).
    entry = cal.profile.find(model.name, 1)
    profile = fit_engine_profile(
        records, model, hardware=hardware, source="sim_vs_runtime steps served at the rate",
        measurement=measurement, fallback=None if entry is None else entry.coefficients,
    )  # fmt: skip
    # A colocated engine's loop at this rate replaces the profile's (if it was modelled);
    # 1P1D keeps the loops of its hops.
    loop_s = loops.get("engine", 0.0) / 1e3 if colocated and cal.engine_loop_s else 0.0
    return dataclasses.replace(
        cal, profile=profile, latency=profile.latency_model(model, 1),
        noise=profile.step_noise_by_kind(model, 1) if cal.noise is not None else None, wake=None,
        engine_loop_s=loop_s,
    )  # fmt: skip


def _loop_gaps_ms(records, *, colocated: bool) -> dict[str, float]:
    """Per step kind (`steps.loop_gaps_s`: a 1P1D instance runs one kind) and, for a
    colocated engine, its loop between any two steps ("engine", `steps.engine_loop_s`)."""
    out = {k: 1e3 * v for k, v in loop_gaps_s(records).items()}
    loop = engine_loop_s(records) if colocated else None
    if loop is not None:
        out["engine"] = 1e3 * loop
    return out


def engine_loop_from_profile(profile: ProfileSet) -> float:
    """A colocated engine profile's loop between busy steps (s; 0 when it has none)."""
    raw = profile.measurement.get("loop_gap_ms") or {}
    return raw.get("engine", 0.0) / 1e3


def loops_from_profile(profile: ProfileSet) -> dict[str, float]:
    """``prefill_loop_s`` / ``decode_loop_s`` of `ProcessHops` from an instance profile's
    ``measurement.loop_gap_ms`` (`steps.loop_gaps_s` of its steps; {} when it has none)."""
    raw = profile.measurement.get("loop_gap_ms") or {}
    return {f"{k}_loop_s": raw[k] / 1e3 for k in ("prefill", "decode") if k in raw}


def wake_from_profile(profile: ProfileSet) -> WakePenalty | None:
    """The wake-up penalty ``profile_engine`` measured (None: a profile without one)."""
    raw = profile.measurement.get("wake_penalty")
    if not isinstance(raw, dict):
        return None
    return WakePenalty(tuple(raw["idle_s"]), tuple(raw["extra_s"]))


def profile_threads(profile: ProfileSet, where: str) -> int:
    """The thread count ``profile`` was measured with (ValueError when it does not say)."""
    threads = profile.measurement.get("threads")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"{where}: measurement.threads must be the positive int the profile was measured "
            f"with, got {threads!r}; profile with drt-run profile --threads N"
        )
    return threads


def kv_transfer_from_bench(path: str | Path, bytes_per_token: int) -> KVTransferSpec:
    """The shm transport's cost from ``transfer_suite.py``'s results: its submit-to-success
    latency, and the tiny model's one-thread pull bandwidth per KV token."""
    raw = json.loads(Path(path).read_text())
    pulls = [
        b for b in raw.get("bandwidth", []) if b.get("threads") == 1 and "tiny" in b.get("case", "")
    ]
    if not pulls or "latency" not in raw:
        raise ValueError(
            f"{path}: needs a one-thread llama-tiny 'bandwidth' case and a 'latency' entry "
            "(bench/results/transfer_cpu.json as transfer_suite.py writes it)"
        )
    return KVTransferSpec(
        seconds_per_token=bytes_per_token / (pulls[0]["pull_gbps"] * 1e9),
        latency_s=raw["latency"]["submit_to_success_median_us"] * 1e-6,
    )


def measure_kv_transfer(engine, prompt_len: int, num_requests: int = 8) -> KVTransferSpec:
    """The 1P1D KV path of the idle runtime ``engine`` (a `Controller`): ``num_requests``
    prompts of ``prompt_len`` tokens, one at a time; each one's first token -> KV in the
    decode instance (the controller's ``transfer_queue + transfer``: its messages and the
    decode instance noticing them, which the shm bench's bare pull leaves out). The median
    is the spec's fixed latency (the per-token part is folded in at this length)."""
    from distserve_rt.sampling_params import SamplingParams

    seconds = []
    for i in range(num_requests):
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        engine.add_request(f"kv-probe-{i}", [1 + i % 7] * prompt_len, params)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step(0.05) if o.finished]
        breakdown = outputs[-1].metrics.breakdown if outputs else None
        if breakdown is None or breakdown.transfer is None:
            raise RuntimeError(f"kv-probe-{i} finished without a KV transfer: {outputs!r}")
        seconds.append((breakdown.transfer_queue or 0.0) + breakdown.transfer)
    return KVTransferSpec(latency_s=float(np.median(seconds)))


def measure_hops(engine, target, cal: Calibration, workload, num_requests: int = 20):
    """The time between 1P1D's processes that no step shows (`ProcessHops`), from the idle
    runtime ``engine``: ``num_requests`` of ``workload``'s requests 0.15 s apart (no queue)
    served and simulated without hops. ``dispatch_s`` is the runtime's extra prefill queue
    (controller -> instance); ``token_s`` the rest of its extra TTFT (the first token back
    to the controller, and what the prefill fit misses on an idle instance: measured
    0.7 + ~2 ms, bench/README.md). The loops per step come from ``cal``'s instance profile
    (`loops_from_profile`: its busy instances' pauses between steps), simulated here too."""
    from distserve_rt.benchmarks.sim_vs_runtime.replay import replay
    from distserve_rt.planner.simulator import ProcessHops
    from distserve_rt.workloads.workload import Workload

    n = min(num_requests, workload.num_requests)
    few = Workload("hops", workload.prompt_lens[:n], workload.output_lens[:n])
    arrival = np.arange(n) * 0.15
    served = replay(engine, arrival, few)
    loops = loops_from_profile(cal.profile)  # the instances' loops, measured busy
    setup = dataclasses.replace(target.setup, hops=ProcessHops(**loops))
    simulated = target.simulate(setup, cal.latency, arrival, few, noise=None, wake=cal.wake)
    queue_ms = served.extra["mean_prefill_queue_ms"] - simulated.extra["mean_prefill_queue_ms"]
    dispatch_s = max(0.0, queue_ms / 1e3)
    ttft_s = float(np.mean(served.ttft) - np.mean(simulated.ttft))
    return ProcessHops(dispatch_s, max(0.0, ttft_s - dispatch_s), **loops)


def load_profiles(path: str | Path) -> list[ProfileSet]:
    """The profiles in ``path``: a profile JSON (`drt-run profile`), or a result of this
    harness, whose runs' profiles are reused (same steps, same drift probe reference)."""
    from distserve_rt.planner.profiles import load_profile, profile_from_dict

    raw = json.loads(Path(path).read_text()) if str(path).endswith(".json") else {}
    if raw.get("benchmark") != "sim_vs_runtime":
        return [load_profile(path)]
    return [
        profile_from_dict(p["profile"], f"{path}: profiles.{k}.profile")
        for k, p in raw.get("profiles", {}).items()
    ]

"""Latency profiles: versioned JSON files of fitted coefficients for one kind of hardware.

Schema (``schema_version`` 2; times in ms, lengths in tokens)::

    {"schema_version": 2, "hardware": "a100-80g", "units": "ms", "source": "...",
     "entries": [{"model": "opt-13b", "tp": 1, "form": "fitted",
                  "coefficients": {"prefill": [a, b, c], "decode_small": [a, b, c],
                                   "decode_large": [a, b, c], "decode_threshold": 95,
                                   "overhead": o, "mixed": [a, b, c, d],  # optional
                                   "decode_batch_factors": [[1, f1], [2, f2], ...]},  # opt.
                  "fit_error": {"prefill": {"mean_rel": .., "max_rel": .., ...}, ...},
                  "held_out_error": {"decode": {...}, ...},               # optional
                  "step_noise": {"decode": [21 quantiles], ..., "all": [...]},  # optional
                  "step_noise_autocorrelation": {"decode": 0.8, ...},  # optional, 0
                  "step_noise_sequence": {"decode": [ratios in step order], ...}}],  # opt.
     "analytic": {"coefficients": {"c1": .., ..., "attn_block_size": 128},
                  "fit_error": {...}},           # optional
     "measurement": {"hardware": .., "model": .., "dtype": "float32", "tp": 1, "pp": 1,
                     "device": "cpu", "threads": 2, ...}}  # optional

Version 2 added the optional keys (an engine-step profile: `profile_fit.fit_engine_steps`);
version 1 files load unchanged. ``measurement`` records where and how a profile made by
`drt-run profile` was measured; it is kept as read. Planning with a profile for another
model, TP degree, dtype or hardware than it measured is logged as a WARNING, once per
mismatch (`ProfileSet.latency_model`, `ProfileSet.check_use`).

Built-in profiles (package data): ``a100-80g-distserve`` and ``a100-80g-vllm``, DistServe's
fitted A100-80GB coefficients for its own kernels and for vLLM's (its baseline), from
`LLMServe/DistServe` ``simdistserve/estimators/profile_data/`` at commit ``82831f1``
(Apache-2.0); see ``distserve_rt/data/README.md``.

A (model, TP) with no fitted entry gets the paper's analytic form, whose C1..C5 are
hardware constants: taken from ``analytic`` when the file has it, otherwise fitted on the
spot from synthetic samples of every fitted entry of the file whose model is a known preset
(`ProfileSet.analytic_coefficients`). The prediction is an extrapolation across models and
TP degrees; its fit error on the profiled entries is reported so users can judge it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from distserve_rt.logger import init_logger
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.presets import PRESETS
from distserve_rt.planner.latency_model import (
    AnalyticCoefficients,
    AnalyticLatencyModel,
    FittedCoefficients,
    FittedLatencyModel,
    LatencyModel,
)
from distserve_rt.planner.profile_fit import FitError, fit_analytic_form
from distserve_rt.planner.step_noise import KindNoise, StepTimeNoise
from distserve_rt.workloads.datasets import data_path

logger = init_logger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

BUILTIN_PROFILES = {
    "a100-80g-distserve": "distserve_profiler_a100_80g.distserve.json",
    "a100-80g-vllm": "distserve_profiler_a100_80g.vllm.json",
}
_DISTSERVE_SOURCE = (
    "LLMServe/DistServe simdistserve/estimators/profile_data/{file} @ 82831f1 (Apache-2.0)"
)


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    """Fitted coefficients of one (model, TP) on the profile's hardware."""

    model: str
    tp: int
    coefficients: FittedCoefficients
    fit_error: dict[str, FitError] = field(default_factory=dict)
    held_out_error: dict[str, FitError] = field(default_factory=dict)
    """Error on steps the fit did not see, per step kind (engine-step profiles)."""
    step_noise: dict[str, StepTimeNoise] = field(default_factory=dict)
    """measured/predicted per step kind and "all" (engine-step profiles; else empty)."""

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp of {self.model!r} must be a positive int, got {self.tp!r}")


@dataclass
class ProfileSet:
    """All profiled (model, TP) pairs of one kind of hardware."""

    hardware: str
    entries: list[ProfileEntry]
    source: str = ""
    analytic: AnalyticCoefficients | None = None
    analytic_fit_error: dict[str, FitError] = field(default_factory=dict)
    measurement: dict[str, object] = field(default_factory=dict)
    """How the profile was measured (`drt-run profile`); empty for DistServe's files."""
    extrapolated: dict[tuple[str, int], str] = field(default_factory=dict, compare=False)
    """(model, tp) pairs planned from the analytic form, with the note logged for each."""
    mismatches: dict[tuple[str, str], str] = field(default_factory=dict, compare=False)
    """(what, value used) planned with a profile measured on another dtype or hardware,
    with the warning logged for each."""

    def find(self, model: str, tp: int) -> ProfileEntry | None:
        for entry in self.entries:
            if entry.model == model and entry.tp == tp:
                return entry
        return None

    def analytic_coefficients(self) -> AnalyticCoefficients:
        """The paper's C1..C5 for this hardware (fitted from the entries on first use)."""
        if self.analytic is None:
            self.analytic, self.analytic_fit_error = _fit_analytic_from_entries(self)
        return self.analytic

    def latency_model(
        self, model: ModelConfig, tp: int, *, dtype: str | None = None, hardware: str | None = None
    ) -> LatencyModel:
        """Fitted model for (model.name, tp) if profiled, else the analytic form (see module),
        said once per model in the log and kept per (model, tp) in `extrapolated`: a plan
        for a model this profile never measured is an extrapolation; the user must know it.
        ``dtype``/``hardware``: what the plan is for, checked by `check_use`."""
        self.check_use(dtype=dtype, hardware=hardware)
        entry = self.find(model.name, tp)
        if entry is not None:
            return FittedLatencyModel(entry.coefficients, tp)
        coefficients = self.analytic_coefficients()
        if (model.name, tp) not in self.extrapolated:
            first_of_model = all(m != model.name for m, _ in self.extrapolated)
            self.extrapolated[(model.name, tp)] = self.extrapolation_note(model.name, tp)
            if first_of_model:  # a search asks for many tp: one line per model is enough
                logger.warning("%s", self.extrapolated[(model.name, tp)])
        return AnalyticLatencyModel(coefficients, model, tp)

    def step_noise(self, model: str | ModelConfig, tp: int, kind: str = "all"):
        """The measured step-time noise (`StepTimeNoise`) of (model, tp) for step ``kind``
        ("prefill", "decode", "mixed" or "all"); None when the profile has none (DistServe's
        files, isolated-step profiles, an unprofiled model)."""
        name = model if isinstance(model, str) else model.name
        entry = self.find(name, tp)
        return None if entry is None else entry.step_noise.get(kind)

    def step_noise_by_kind(self, model: str | ModelConfig, tp: int) -> KindNoise | None:
        """The measured noise of (model, tp) per step kind (`KindNoise`: each simulated
        step draws from its own kind's distribution); None as `step_noise`."""
        name = model if isinstance(model, str) else model.name
        entry = self.find(name, tp)
        if entry is None or "all" not in entry.step_noise:
            return None
        kinds = {k: v for k, v in entry.step_noise.items() if k != "all"}
        return KindNoise(kinds, entry.step_noise["all"])

    def check_use(self, *, dtype: str | None = None, hardware: str | None = None) -> list[str]:
        """Warns (once per mismatch) when the plan's ``dtype`` or ``hardware`` is not what the
        profile was measured on (its ``measurement``, else its ``hardware``); returns the
        warnings of this call. Unknown on either side is not a mismatch."""
        measured = {
            "dtype": self.measurement.get("dtype"),
            "hardware": self.measurement.get("hardware") or self.hardware,
        }
        notes = []
        for what, used in (("dtype", dtype), ("hardware", hardware)):
            have = measured[what]
            if used is None or not have or _same(what, str(have), str(used)):
                continue
            note = (
                f"profile {self.hardware!r} was measured with {what} {have!r} and is used for "
                f"{what} {used!r}: its step times may be far off; profile there (drt-run profile)"
            )
            if (what, str(used)) not in self.mismatches:
                self.mismatches[(what, str(used))] = note
                logger.warning("%s", note)
            notes.append(note)
        return notes

    def extrapolation_note(self, model: str, tp: int) -> str:
        """What a (model, tp) without an entry is planned from, in one line."""
        measured = sorted({f"{e.model} tp={e.tp}" for e in self.entries})
        error = self.analytic_fit_error.get("decode") or self.analytic_fit_error.get("prefill")
        how = f"; its mean error on them is {error.mean_rel:.0%}" if error else ""
        return (
            f"profile {self.hardware!r} has no measurement of {model} at tp={tp}: its step "
            f"times are extrapolated with the paper's analytic form fitted on "
            f"{', '.join(measured)}{how}. Profile this model (drt-run profile) to plan it "
            f"from its own measurements"
        )

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "schema_version": SCHEMA_VERSION,
            "hardware": self.hardware,
            "units": "ms",
            "source": self.source,
            "entries": [
                {
                    "model": e.model,
                    "tp": e.tp,
                    "form": "fitted",
                    "coefficients": e.coefficients.to_dict(),
                    "fit_error": {k: v.to_dict() for k, v in e.fit_error.items()},
                    **_engine_fit_dict(e),
                }
                for e in self.entries
            ],
        }
        if self.analytic is not None:
            out["analytic"] = {
                "coefficients": self.analytic.to_dict(),
                "fit_error": {k: v.to_dict() for k, v in self.analytic_fit_error.items()},
            }
        if self.measurement:
            out["measurement"] = self.measurement
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _same(what: str, a: str, b: str) -> bool:
    """Whether two dtype or hardware names mean the same: hardware names are compared by
    their letters and digits, and a short name matches a long one containing each of its
    parts ("a100-80g" is "NVIDIA A100-SXM4-80GB")."""
    if what == "dtype":
        return a.removeprefix("torch.") == b.removeprefix("torch.")
    parts_a, parts_b = (re.findall(r"[a-z0-9]+", x.lower()) for x in (a, b))
    short, long = sorted((parts_a, parts_b), key=len)
    return bool(short) and all(p in "".join(long) for p in short)


def _engine_fit_dict(entry: ProfileEntry) -> dict[str, object]:
    out: dict[str, object] = {}
    if entry.held_out_error:
        out["held_out_error"] = {k: v.to_dict() for k, v in entry.held_out_error.items()}
    if entry.step_noise:
        out["step_noise"] = {k: v.to_list() for k, v in entry.step_noise.items()}
        # Beside the quantile lists, so readers of the lists alone still parse them.
        out["step_noise_autocorrelation"] = {
            k: v.autocorrelation for k, v in entry.step_noise.items()
        }
        sequences = {k: list(v.sequence) for k, v in entry.step_noise.items() if v.sequence}
        if sequences:
            out["step_noise_sequence"] = sequences
    return out


def _fit_errors(raw: dict) -> dict[str, FitError]:
    return {
        k: FitError(v["mean_rel"], v["max_rel"], v["num_samples"], v.get("p90_rel"))
        for k, v in raw.items()
    }


def profile_from_dict(raw: dict, where: str = "profile") -> ProfileSet:
    """Parse the schema above; ValueError naming what is wrong."""
    version = raw.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{where}: schema_version must be one of {READABLE_SCHEMA_VERSIONS}, got {version!r}"
        )
    if raw.get("units", "ms") != "ms":
        raise ValueError(f"{where}: units must be 'ms', got {raw.get('units')!r}")
    try:
        entries = [
            ProfileEntry(
                e["model"],
                e["tp"],
                FittedCoefficients(**e["coefficients"]),
                _fit_errors(e.get("fit_error", {})),
                _fit_errors(e.get("held_out_error", {})),
                {
                    k: StepTimeNoise(
                        tuple(q),
                        e.get("step_noise_autocorrelation", {}).get(k, 0.0),
                        tuple(e.get("step_noise_sequence", {}).get(k, ())),
                    )
                    for k, q in e.get("step_noise", {}).items()
                },
            )
            for e in raw["entries"]
        ]
        analytic, analytic_err = None, {}
        if "analytic" in raw:
            analytic = AnalyticCoefficients(**raw["analytic"]["coefficients"])
            analytic_err = _fit_errors(raw["analytic"].get("fit_error", {}))
        return ProfileSet(
            raw["hardware"],
            entries,
            raw.get("source", ""),
            analytic,
            analytic_err,
            dict(raw.get("measurement", {})),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: malformed profile ({type(exc).__name__}: {exc})") from None


def _from_distserve(raw: dict, hardware: str, source: str) -> ProfileSet:
    """DistServe's ``{"facebook/opt-13b": {"1": {...}}}`` layout -> a ProfileSet."""
    entries = []
    for hf_name, by_tp in raw.items():
        for tp, co in by_tp.items():
            coeffs = FittedCoefficients(
                co["prefill"],
                co["decoding_smallbs"],
                co["decoding_largebs"],
                int(co["decoding_large_small_bs_threshold"]),
            )
            entries.append(ProfileEntry(hf_name.split("/")[-1], int(tp), coeffs))
    # DistServe profiled its fp16 kernels (and vLLM's) on A100-SXM4-80GB.
    return ProfileSet(hardware, entries, source, measurement={"dtype": "float16"})


def load_profile(name_or_path: str | Path) -> ProfileSet:
    """A built-in profile by name (``a100-80g-distserve``, ``a100-80g-vllm``) or a JSON file."""
    if str(name_or_path) in BUILTIN_PROFILES:
        filename = BUILTIN_PROFILES[str(name_or_path)]
        raw = json.loads(data_path(filename).read_text())
        return _from_distserve(raw, "a100-80g", _DISTSERVE_SOURCE.format(file=filename))
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"profile {str(name_or_path)!r} is neither a built-in ({sorted(BUILTIN_PROFILES)}) "
            f"nor an existing file"
        )
    return profile_from_dict(json.loads(path.read_text()), str(path))


def _synthetic_samples(entry: ProfileEntry, model: ModelConfig):
    """Step times the entry's fitted form predicts over a grid of batches (ms)."""
    lm = FittedLatencyModel(entry.coefficients, entry.tp)
    prefill = []
    for length in (64, 256, 512, 1024, 2048):
        for num in (1, 2, 4):
            lens = [length] * num
            prefill.append((model, entry.tp, lens, lm.prefill_s(sum(lens), num * length**2) * 1e3))
    decode = []
    for batch in (1, 8, 32, 64, 128, 256):
        for ctx in (128, 512, 1024, 2048):
            lens = [ctx] * batch
            decode.append((model, entry.tp, lens, lm.decode_s(batch, batch * (ctx + 1)) * 1e3))
    return prefill, decode


def _fit_analytic_from_entries(profile: ProfileSet):
    prefill, decode = [], []
    for entry in profile.entries:
        if entry.model in PRESETS:
            p, d = _synthetic_samples(entry, PRESETS[entry.model])
            prefill += p
            decode += d
    if not prefill:
        raise ValueError(
            f"profile {profile.hardware!r} has no analytic coefficients and none of its models "
            f"({sorted({e.model for e in profile.entries})}) is a known preset to fit them from; "
            f"profile this (model, tp) or add an 'analytic' section"
        )
    return fit_analytic_form(prefill, decode)

"""Step-time models of one instance: how long a prefill batch or a decode step takes.

Two forms, both per (model, TP degree) and in **milliseconds** internally (the unit of
DistServe's profiles); the public methods return **seconds**.

* `FittedLatencyModel` — the form DistServe's simulator fits per (model, TP):
  prefill ``a + b·Σl + c·Σl²`` over the prompt lengths ``l`` of the batch;
  decode ``a + b·Σ(ctx+1) + c·B`` over the ``B`` running requests with context ``ctx``,
  with one fit below ``decode_threshold`` requests and one at or above it.
  Profiles fitted from the running engine's steps (`profile_fit.fit_engine_steps`) add a
  per-step ``overhead`` (the host's scheduling and postprocessing, paid by every step of
  any kind) and a fitted chunked-prefill form for steps that mix prefill chunks and
  decodes: ``a + b·(Σchunk + B) + c·Σchunk·(prefix+chunk) + d·Σ(ctx+1)`` (the decode
  tokens ride in the chunks' GEMMs; both attentions are paid). DistServe's files have
  neither (overhead 0, mixed steps approximated, see `LatencyModel.mixed_s`).
* `AnalyticLatencyModel` — the paper's form (DistServe §4.1 / Appendix), per layer:
  prefill ``C1·(4·t·h² + 2·t·h·m) + C2·3·h·t₂/b + C3``;
  decode ``C4·(4·h² + 2·h·m) + C5·3·h·t``, where
  ``t`` = tokens in the batch (prefill: Σl; decode: Σ context tokens), ``t₂`` = Σl²,
  ``h`` = hidden size, ``m`` = FFN width, ``b`` = the attention kernel's block size.
  We add one term the paper does not have, a per-step decode constant ``C6`` (kernel
  launches, TP all-reduce latency, sampling): without it the fit to DistServe's A100 decode
  profiles has a 20% mean / 69% max relative error, with it 13% / 60%, because a decode step
  at TP 4 is far from 4x faster than at TP 1 (the rest is the batch-size term the paper's
  form lacks). ``C6 = 0`` is the paper's form.
  We multiply the per-layer terms by ``num_layers`` and divide them by the TP degree (each
  of the TP devices does 1/TP of every GEMM and of the heads), keeping C3 as a per-step
  constant. The C's are then properties of the *hardware*, not of a model, which is what
  lets one hardware profile predict a (model, TP) that was never profiled
  (`profiles.ProfileSet.latency_model`).

Pipeline stages and KV transfer times are in `instance_timing.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve_rt.models.config import ModelConfig

_MS = 1e-3


def _check_triple(name: str, value) -> tuple[float, float, float]:
    try:
        a, b, c = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers [a, b, c], got {value!r}") from None
    return a, b, c


def _check_mixed(value) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        a, b, c, d = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"mixed must be four numbers [a, b, c, d], got {value!r}") from None
    return a, b, c, d


def _check_batch_factors(value) -> tuple[tuple[int, float], ...]:
    try:
        rows = tuple((int(size), float(f)) for size, f in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"decode_batch_factors must be [batch size, factor] pairs, got {value!r}"
        ) from None
    sizes = [size for size, _ in rows]
    if any(size < 1 for size in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(
            f"decode_batch_factors' batch sizes must be ascending ints >= 1, got {sizes!r}"
        )
    if not all(0 < f < float("inf") for _, f in rows):
        raise ValueError(f"decode_batch_factors' factors must be finite and > 0, got {value!r}")
    return rows


class LatencyModel:
    """Interface: step times of one instance stage-less (all layers, ``tp`` devices), in s."""

    tp: int

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        """A prefill batch of prompts with Σl = ``num_tokens`` and Σl² = ``sum_sq_lens``."""
        raise NotImplementedError

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        """``(alpha, beta)`` with decode step time = alpha + beta·Σ(ctx+1) seconds.

        A decode step is affine in the context tokens for a fixed batch size; the simulator
        uses this to jump over many steps at once in closed form.
        """
        raise NotImplementedError

    def decode_s(self, batch_size: int, num_ctx_tokens: int) -> float:
        """One decode step of ``batch_size`` requests holding Σ(ctx+1) = ``num_ctx_tokens``."""
        alpha, beta = self.decode_affine(batch_size)
        return alpha + beta * num_ctx_tokens

    def mixed_s(
        self, num_prefill_tokens: int, prefill_sum_sq: int, batch_size: int, num_ctx_tokens: int
    ) -> float:
        """A chunked-prefill step: prefill chunks plus ``batch_size`` decodes in one batch.

        Approximation for profiles without a fitted mixed form (DistServe's, isolated-step
        ones; `FittedLatencyModel` uses the fitted one when it has it): the decode tokens ride in
        the prefill's GEMMs (``num_prefill_tokens + batch_size`` tokens through the linear
        layers) and add their attention cost (beta·Σ ctx). ``prefill_sum_sq`` should be
        Σ chunk·(prefix + chunk), the attention work of chunks with a prefix.
        """
        if num_prefill_tokens == 0:
            return self.decode_s(batch_size, num_ctx_tokens)
        _, beta = self.decode_affine(max(batch_size, 1))
        t = self.prefill_s(num_prefill_tokens + batch_size, prefill_sum_sq)
        return t + beta * num_ctx_tokens


@dataclass(frozen=True, slots=True)
class FittedCoefficients:
    """DistServe's fitted form, ms. Each triple is ``[a, b, c]`` (see module docstring)."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    decode_threshold: int = 95
    """Batch size from which ``decode_large`` applies (DistServe: 95)."""
    overhead: float = 0.0
    """Per-step host cost (ms) added to every step; 0 in DistServe's profiles."""
    mixed: tuple[float, float, float, float] | None = None
    """Chunked-prefill steps ``[a, b, c, d]`` (module docstring); None = approximated."""
    decode_batch_factors: tuple[tuple[int, float], ...] = ()
    """``(smallest batch size, factor)`` rows, sizes ascending: a decode step of B requests
    takes the form's time times the factor of the last row whose size is <= B (1 before
    the first row; none: the form alone). Fitted from engine steps
    (`profile_fit.fit_engine_steps`): the measured/predicted ratio per batch-size bucket,
    what the affine form leaves by batch size (on 2 CPU cores, steps of one request ran
    6-9% above it and steps of 16-32 4-15% below, where queues build)."""

    def __post_init__(self) -> None:
        for key in ("prefill", "decode_small", "decode_large"):
            object.__setattr__(self, key, _check_triple(key, getattr(self, key)))
        object.__setattr__(self, "mixed", _check_mixed(self.mixed))
        object.__setattr__(
            self, "decode_batch_factors", _check_batch_factors(self.decode_batch_factors)
        )
        if not isinstance(self.decode_threshold, int) or self.decode_threshold < 1:
            raise ValueError(
                f"decode_threshold must be a positive int, got {self.decode_threshold!r}"
            )
        if not isinstance(self.overhead, (int, float)) or not 0 <= self.overhead < float("inf"):
            raise ValueError(f"overhead must be a number of ms >= 0, got {self.overhead!r}")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "prefill": list(self.prefill),
            "decode_small": list(self.decode_small),
            "decode_large": list(self.decode_large),
            "decode_threshold": self.decode_threshold,
        }
        if self.overhead:
            out["overhead"] = self.overhead
        if self.mixed is not None:
            out["mixed"] = list(self.mixed)
        if self.decode_batch_factors:
            out["decode_batch_factors"] = [list(row) for row in self.decode_batch_factors]
        return out

    def decode_factor(self, batch_size: int) -> float:
        """The `decode_batch_factors` factor of a decode step of ``batch_size`` requests."""
        factor = 1.0
        for size, f in self.decode_batch_factors:
            if size > batch_size:
                break
            factor = f
        return factor


@dataclass(frozen=True, slots=True)
class FittedLatencyModel(LatencyModel):
    coefficients: FittedCoefficients
    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        co = self.coefficients
        a, b, c = co.prefill
        return (co.overhead + a + b * num_tokens + c * sum_sq_lens) * _MS

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        co = self.coefficients
        a, b, c = co.decode_small if batch_size < co.decode_threshold else co.decode_large
        f = co.decode_factor(batch_size) * _MS
        return (co.overhead + a + c * batch_size) * f, b * f

    def mixed_s(
        self, num_prefill_tokens: int, prefill_sum_sq: int, batch_size: int, num_ctx_tokens: int
    ) -> float:
        co = self.coefficients
        if co.mixed is None or num_prefill_tokens == 0 or batch_size == 0:
            return LatencyModel.mixed_s(
                self, num_prefill_tokens, prefill_sum_sq, batch_size, num_ctx_tokens
            )
        a, b, c, d = co.mixed
        num_tokens = num_prefill_tokens + batch_size
        return (co.overhead + a + b * num_tokens + c * prefill_sum_sq + d * num_ctx_tokens) * _MS


@dataclass(frozen=True, slots=True)
class AnalyticCoefficients:
    """The paper's C1..C5 in ms per unit of the term they multiply (hardware constants)."""

    c1: float
    c2: float
    c3: float
    c4: float
    c5: float
    c6: float = 0.0
    """Per-step decode constant (ms); not in the paper's form, see the module docstring."""
    attn_block_size: int = 128
    """``b`` in the prefill attention term (FlashAttention's tile; folded into C2)."""

    def __post_init__(self) -> None:
        for key in ("c1", "c2", "c3", "c4", "c5", "c6"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
        if not isinstance(self.attn_block_size, int) or self.attn_block_size < 1:
            raise ValueError(
                f"attn_block_size must be a positive int, got {self.attn_block_size!r}"
            )

    def to_dict(self) -> dict[str, object]:
        return {
            k: getattr(self, k) for k in ("c1", "c2", "c3", "c4", "c5", "c6", "attn_block_size")
        }


def analytic_features(model: ModelConfig, tp: int) -> dict[str, float]:
    """Per-unit multipliers of C1, C2, C4, C5 for ``model`` at TP ``tp`` (layers / TP folded in).

    prefill_ms = C1·f1·t + C2·f2·t₂/b + C3;  decode_ms = C4·f4 + C5·f5·t + C6.
    """
    h, m, num_layers = model.hidden_size, model.intermediate_size, model.num_layers
    scale = num_layers / tp
    return {
        "f1": scale * (4 * h * h + 2 * h * m),
        "f2": scale * 3 * h,
        "f4": scale * (4 * h * h + 2 * h * m),
        "f5": scale * 3 * h,
    }


@dataclass(frozen=True, slots=True)
class AnalyticLatencyModel(LatencyModel):
    coefficients: AnalyticCoefficients
    model: ModelConfig
    tp: int = 1
    # Per-unit seconds of each term, precomputed: the simulator calls these per batch.
    _k: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be a positive int, got {self.tp!r}")
        co, f = self.coefficients, analytic_features(self.model, self.tp)
        k = (
            co.c1 * f["f1"] * _MS,
            co.c2 * f["f2"] / co.attn_block_size * _MS,
            co.c3 * _MS,
            co.c4 * f["f4"] * _MS,
            co.c5 * f["f5"] * _MS,
            co.c6 * _MS,
        )
        object.__setattr__(self, "_k", k)

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        k = self._k
        return k[0] * num_tokens + k[1] * sum_sq_lens + k[2]

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return self._k[3] + self._k[5], self._k[4]


@dataclass(frozen=True, slots=True)
class ConstantLatencyModel(LatencyModel):
    """Fixed step times (s), whatever the batch: the M/D/1 checks and unit tests use it."""

    prefill_time_s: float
    decode_time_s: float
    tp: int = 1

    def prefill_s(self, num_tokens: int, sum_sq_lens: int) -> float:
        return self.prefill_time_s

    def decode_affine(self, batch_size: int) -> tuple[float, float]:
        return self.decode_time_s, 0.0

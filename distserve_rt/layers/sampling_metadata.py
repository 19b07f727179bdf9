"""Per-step sampling description of a batch, built once from its requests' `SamplingParams`.

The model runner calls `SamplingMetadata.build` once per step (after the batch is fixed)
and hands the result to `Sampler` together with the logits. All per-row tensors live on
the logits' device so that the sampler does no host work per row, apart from one noise
draw per seeded row (a request's seed must not depend on its batch neighbours).

Generators are owned by the caller: a seeded request gets one `make_generator(seed, device)`
when it is admitted and keeps it until it finishes, so its random stream continues from
step to step exactly as if it were alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distserve_rt.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own random stream, on the device its logits will be on.

    Create it once per request (not per step) and pass it to `SamplingMetadata.build` on
    every step: the sampler draws one row of noise from it per step.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def generator_state(generator: torch.Generator) -> bytes:
    """A request's random stream as bytes, to continue it in another process (a migrated
    request's decode instance, or its sampling worker process). The bytes are the device's
    kind of state (a CPU generator's differ from a CUDA one's): restore them on the same
    kind of device."""
    return generator.get_state().numpy().tobytes()


def restore_generator(state: bytes, device: torch.device | str) -> torch.Generator:
    """The generator `generator_state` saved, on `device` (where the logits are); it draws
    what the saved one would have drawn next."""
    generator = torch.Generator(device=torch.device(device))
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


@dataclass(slots=True)
class SamplingMetadata:
    """What the sampler needs for one step of ``num_rows`` rows (one row per request).

    Tensors that no row needs are None, so the sampler skips that pass entirely.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    """Every row is greedy: the sampler only takes the argmax."""
    all_random: bool
    """No row is greedy."""
    greedy_mask: torch.Tensor | None
    """bool ``[num_rows]``; None when ``all_greedy`` or ``all_random``."""
    temperature: torch.Tensor | None
    """float32 ``[num_rows]``; 1.0 on greedy rows; None when ``all_greedy``."""
    top_k: torch.Tensor | None
    """int64 ``[num_rows]`` in ``[1, vocab_size]`` (vocab_size = keep all); None if no row
    restricts it."""
    max_top_k: int
    """Largest top_k below vocab_size over the rows (host int: no device sync); 0 if none."""
    top_p: torch.Tensor | None
    """float32 ``[num_rows]`` in ``(0, 1]``; None if no row restricts it."""
    min_p: torch.Tensor | None
    """float32 ``[num_rows]`` in ``[0, 1]``; None if no row uses it."""
    generators: dict[int, torch.Generator]
    """Row index -> that seeded, non-greedy request's own generator."""
    seeded_rows: torch.Tensor | None
    """int64 ``[len(generators)]``: the keys of `generators`, in order; None if empty."""
    batch_generator: torch.Generator | None
    """Noise for the unseeded rows; None = torch's default generator of the device."""
    suppress_rows: torch.Tensor | None
    """int64 ``[num_suppressed]``: with `suppress_token_ids`, the (row, token) pairs whose
    logits are set to -inf because the row has fewer than min_tokens generated tokens."""
    suppress_token_ids: torch.Tensor | None
    """int64 ``[num_suppressed]``."""
    max_num_logprobs: int | None
    """Most top logprobs any row asked for (0 = only the sampled token's); None = no row
    asked for logprobs."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        num_generated: Sequence[int],
        generators: Sequence[torch.Generator | None],
        *,
        eos_token_id: int | None,
        vocab_size: int,
        device: torch.device | str,
        batch_generator: torch.Generator | None = None,
    ) -> SamplingMetadata:
        """``params[i]``, ``num_generated[i]`` (output tokens so far) and ``generators[i]``
        (the request's `make_generator`, None when unseeded) describe row ``i``."""
        device = torch.device(device)
        num_rows = len(params)
        _check_batch(params, num_generated, generators, vocab_size, device, batch_generator)
        if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id must be in [0, {vocab_size}), got {eos_token_id}")
        greedy = [p.greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        meta = cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None,
            temperature=None,
            top_k=None,
            max_top_k=0,
            top_p=None,
            min_p=None,
            generators={},
            seeded_rows=None,
            batch_generator=batch_generator,
            suppress_rows=None,
            suppress_token_ids=None,
            max_num_logprobs=_max_num_logprobs(params),
        )
        meta._set_suppression(params, num_generated, eos_token_id, device)
        if not all_greedy:
            meta._set_random_params(params, greedy, generators, device)
        return meta

    def _set_random_params(
        self,
        params: Sequence[SamplingParams],
        greedy: list[bool],
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ) -> None:
        # Greedy rows get neutral values: their sampled token is replaced by the argmax.
        sampled = [(p, g) for p, g in zip(params, greedy, strict=True)]
        if not self.all_random:
            self.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
        temps = [1.0 if g else p.temperature for p, g in sampled]
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device)
        vocab = self.vocab_size
        top_ks = [vocab if g else _effective_top_k(p, vocab) for p, g in sampled]
        restricted = [k for k in top_ks if k < self.vocab_size]
        if restricted:
            self.max_top_k = max(restricted)
            self.top_k = torch.tensor(top_ks, dtype=torch.int64, device=device)
        top_ps = [1.0 if g else p.top_p for p, g in sampled]
        if any(p < 1.0 for p in top_ps):
            self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)
        min_ps = [0.0 if g else p.min_p for p, g in sampled]
        if any(p > 0.0 for p in min_ps):
            self.min_p = torch.tensor(min_ps, dtype=torch.float32, device=device)
        self.generators = {
            row: gen
            for row, (gen, g) in enumerate(zip(generators, greedy, strict=True))
            if gen is not None and not g
        }
        if self.generators:
            self.seeded_rows = torch.tensor(list(self.generators), dtype=torch.int64, device=device)

    def _set_suppression(
        self,
        params: Sequence[SamplingParams],
        num_generated: Sequence[int],
        eos_token_id: int | None,
        device: torch.device,
    ) -> None:
        # min_tokens holds whatever ignore_eos says: a request must not end before it.
        rows: list[int] = []
        token_ids: list[int] = []
        for row, (p, n) in enumerate(zip(params, num_generated, strict=True)):
            if n >= p.min_tokens:
                continue
            ids = set(p.stop_token_ids)
            if eos_token_id is not None:
                ids.add(eos_token_id)
            rows.extend([row] * len(ids))
            token_ids.extend(sorted(ids))
        if rows:
            self.suppress_rows = torch.tensor(rows, dtype=torch.int64, device=device)
            self.suppress_token_ids = torch.tensor(token_ids, dtype=torch.int64, device=device)


def _effective_top_k(p: SamplingParams, vocab_size: int) -> int:
    # Keeping more tokens than the vocabulary has is keeping all of them.
    return vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size)


def _max_num_logprobs(params: Sequence[SamplingParams]) -> int | None:
    asked = [p.logprobs for p in params if p.logprobs is not None]
    return max(asked) if asked else None


def _check_batch(
    params: Sequence[SamplingParams],
    num_generated: Sequence[int],
    generators: Sequence[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
    batch_generator: torch.Generator | None,
) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    if not params:
        raise ValueError("params must hold at least one row, got an empty batch")
    if not len(params) == len(num_generated) == len(generators):
        raise ValueError(
            f"params, num_generated and generators must have one entry per row, got "
            f"{len(params)}, {len(num_generated)} and {len(generators)}"
        )
    for row, (p, n, gen) in enumerate(zip(params, num_generated, generators, strict=True)):
        if n < 0:
            raise ValueError(f"num_generated[{row}] must be >= 0, got {n}")
        if p.seed is not None and not p.greedy and gen is None:
            raise ValueError(
                f"row {row} has seed={p.seed} but no generator: create one per request "
                "with make_generator(seed, device) and pass it on every step"
            )
        if gen is not None and gen.device.type != device.type:
            raise ValueError(f"generators[{row}] is on {gen.device}, the logits on {device}")
        bad = [t for t in p.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"row {row}: stop_token_ids {bad} are >= vocab_size {vocab_size}")
        if p.logprobs is not None and p.logprobs > vocab_size:
            raise ValueError(f"row {row}: logprobs={p.logprobs} exceeds vocab_size {vocab_size}")
    if batch_generator is not None and batch_generator.device.type != device.type:
        raise ValueError(f"batch_generator is on {batch_generator.device}, the logits on {device}")

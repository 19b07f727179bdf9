"""`StepBatch`: one step's model inputs as plain numpy arrays (no `Request` objects).

The host-side half of `ModelRunner.prepare_inputs`: the engine process turns a
`SchedulerOutput` into a `StepBatch` (token ids, chunk lengths, KV slots, block tables),
which pickles to a few small buffers. A worker in another process builds its tensors from
it alone, so a remote runner needs no block manager and no request objects. The in-process
runner goes through the same conversion, so both paths run the same code.

``block_offset`` shifts every block id (and slot) by a constant: a pipeline-parallel engine
gives each virtual engine its own range of the shared pool (see `engine.llm_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distserve_rt.core.scheduler import SchedulerOutput
from distserve_rt.sampling_params import SamplingParams


@dataclass(slots=True)
class StepBatch:
    """Token order: prefill chunks (list order), then one token per decode."""

    input_ids: np.ndarray
    """int64 [num_tokens]: the tokens whose KV this step computes."""
    prefill_num_new_tokens: np.ndarray
    """int64 [num_prefills]."""
    prefill_prefix_lens: np.ndarray
    """int64 [num_prefills]: tokens already cached before each chunk."""
    prefill_produces_token: np.ndarray
    """bool [num_prefills]: the chunk completes its prompt (its last row is sampled)."""
    decode_seq_lens: np.ndarray
    """int32 [num_decodes]: cached tokens including this step's new one."""
    decode_block_tables: np.ndarray
    """int32 [num_decodes, max_blocks]."""
    slot_mapping: np.ndarray
    """int64 [num_tokens] (negative = padding, not written)."""
    prefill_block_tables: np.ndarray | None
    """int32 [num_prefills, max_blocks]; None when no chunk reads a cached prefix."""
    prefill_num_forks: np.ndarray | None = None
    """int64 [num_prefills]: sequences forked off each chunk's request (parallel sampling),
    each sampling its last row again; None when no chunk forks."""
    block_copies: np.ndarray | None = None
    """int64 [num_pairs, 2]: copy-on-write (src, dst) blocks to copy before the forward;
    None when there are none."""

    @property
    def num_prefill_tokens(self) -> int:
        return int(self.prefill_num_new_tokens.sum())

    @property
    def num_decodes(self) -> int:
        return len(self.decode_seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_scheduler_output(cls, out: SchedulerOutput) -> StepBatch:
        """The arrays of ``out`` (the scheduler's arrays are shared, not copied)."""
        num_p = out.num_prefill_tokens
        input_ids = np.empty(num_p + len(out.decodes), dtype=np.int64)
        start = 0
        for chunk in out.prefills:
            prefix, n = chunk.prefix_len, chunk.num_new_tokens
            input_ids[start : start + n] = chunk.request.token_ids[prefix : prefix + n]
            start += n
        input_ids[num_p:] = [r.token_ids[-1] for r in out.decodes]
        prefills = out.prefills
        return cls(
            input_ids=input_ids,
            prefill_num_new_tokens=np.fromiter(
                (p.num_new_tokens for p in prefills), np.int64, len(prefills)
            ),
            prefill_prefix_lens=np.fromiter(
                (p.prefix_len for p in prefills), np.int64, len(prefills)
            ),
            prefill_produces_token=np.fromiter(
                (p.produces_token for p in prefills), np.bool_, len(prefills)
            ),
            decode_seq_lens=out.decode_seq_lens,
            decode_block_tables=out.decode_block_tables,
            slot_mapping=out.slot_mapping,
            prefill_block_tables=out.prefill_block_tables,
            prefill_num_forks=_num_forks(prefills),
            block_copies=out.block_copies if len(out.block_copies) else None,
        )

    def shift_blocks(self, block_offset: int, block_size: int) -> None:
        """Adds ``block_offset`` to every block id (new arrays: the scheduler's stay as they
        are). Padded table entries move too; they are never read."""
        if block_offset < 0:
            raise ValueError(f"block_offset must be >= 0, got {block_offset}")
        slots = self.slot_mapping
        self.slot_mapping = np.where(slots >= 0, slots + block_offset * block_size, slots)
        self.decode_block_tables = self.decode_block_tables + np.int32(block_offset)
        if self.prefill_block_tables is not None:
            self.prefill_block_tables = self.prefill_block_tables + np.int32(block_offset)
        if self.block_copies is not None:
            self.block_copies = self.block_copies + block_offset


def _num_forks(prefills: list) -> np.ndarray | None:
    """`StepBatch.prefill_num_forks` of the chunks (None, the common case, without forks)."""
    if not any(p.forks for p in prefills):
        return None
    return np.fromiter((len(p.forks) for p in prefills), np.int64, len(prefills))


@dataclass(slots=True)
class StepSampling:
    """What the sampling worker needs for one step, keyed by the engine's ``seq_id``.

    Sampling parameters are shipped once per request (`new_params`), then only ids and
    counts; the worker keeps each request's generator until the id is in `finished`.
    Generator states travel both ways for migrated seeded requests: in with the request's
    parameters (`generator_states`, a decode instance continuing its prefill's stream), and
    out with a step's tokens (`report_generator_states`, a prefill instance handing the
    stream on).
    """

    seq_ids: np.ndarray
    """int64 [num_sampling]: one per sampled row, in `sampling_requests` order."""
    num_output_tokens: np.ndarray
    """int64 [num_sampling]: tokens generated so far (min_tokens suppression)."""
    new_params: list[tuple[int, SamplingParams]]
    """(seq_id, params) of requests the worker has not seen yet."""
    finished: list[int]
    """seq_ids whose state the worker drops before this step."""
    generator_states: dict[int, bytes] = field(default_factory=dict)
    """seq_id -> `layers.generator_state` bytes, for requests of `new_params` whose
    generator is restored from them (on the sampling worker's device) instead of seeded."""
    report_generator_states: list[int] = field(default_factory=list)
    """seq_ids (of this step's seeded rows) whose generator state, after this step's draw,
    the sampling worker returns with the tokens."""

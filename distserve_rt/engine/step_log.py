"""The engine's step log: each executed step's batch shape and how long the step took.

The planner's latency model must reproduce the steps the running engine has, not steps
timed in isolation (issue 15: the engine's steps ran 1.1-1.7x slower than isolated ones).
So the engine itself records, per step, what the simulator needs to predict it: the batch
shape (`StepShape`) and the wall time of the whole `LLMEngine.step` (scheduling, execute,
postprocess), with the part spent in the executor beside it. `drt-run profile` fits the
latency model from these records (`planner.profile_fit.fit_engine_steps`).

Off by default (the engine then only tests one attribute for None per step);
``engine.enable_step_log(N)`` keeps the last N steps in a ring buffer, so a long-running
server cannot grow it without bound.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from distserve_rt.core.scheduler import SchedulerOutput

STEP_KINDS = ("prefill", "decode", "mixed")


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computed, in the latency model's terms (counts in tokens)."""

    num_prefills: int
    """Prefill chunks in the batch (a whole prompt is one chunk)."""
    num_prefill_tokens: int
    """Σ new prefill tokens (the chunks' lengths)."""
    prefill_attn_work: int
    """Σ chunk·(prefix + chunk): the prefill attention work (Σl² for whole prompts)."""
    num_decodes: int
    """Requests computing one token."""
    sum_decode_seq_lens: int
    """Σ decode seq_lens: cached tokens including this step's new one, i.e. Σ(ctx+1)."""

    @classmethod
    def of(cls, batch: SchedulerOutput) -> StepShape:
        chunks = [(p.num_new_tokens, p.prefix_len) for p in batch.prefills]
        return cls(
            num_prefills=len(chunks),
            num_prefill_tokens=sum(n for n, _ in chunks),
            prefill_attn_work=sum(n * (prefix + n) for n, prefix in chunks),
            num_decodes=len(batch.decodes),
            sum_decode_seq_lens=int(batch.decode_seq_lens.sum()),
        )

    @property
    def kind(self) -> str:
        """ "prefill", "decode", "mixed" (chunked prefill's steps) or "empty"."""
        if self.num_prefills and self.num_decodes:
            return "mixed"
        if self.num_prefills:
            return "prefill"
        return "decode" if self.num_decodes else "empty"


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One executed step (seconds, `time.perf_counter` differences)."""

    shape: StepShape
    duration_s: float
    """The whole `LLMEngine.step`: host scheduling + execute + postprocess."""
    execute_s: float
    """The part inside the executor (submit + wait); ``duration_s - execute_s`` is host."""
    start_s: float | None = None
    """When the step began (`time.perf_counter` of the process that ran it; None: not
    recorded). Consecutive steps' starts give the loop's time between them."""

    def to_dict(self) -> dict[str, object]:
        return {
            **asdict(self.shape), "duration_s": self.duration_s, "execute_s": self.execute_s,
            "start_s": self.start_s,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict) -> StepRecord:
        fields = StepShape.__dataclass_fields__
        shape = StepShape(**{k: int(raw[k]) for k in fields})
        start = raw.get("start_s")
        return cls(
            shape, float(raw["duration_s"]), float(raw["execute_s"]),
            None if start is None else float(start),
        )  # fmt: skip


class StepLog:
    """The last ``capacity`` executed steps, oldest first. Empty steps are not recorded."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"step log capacity must be a positive int, got {capacity!r}")
        self._records: deque[StepRecord] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._records.maxlen or 0

    def record(
        self,
        batch: SchedulerOutput,
        duration_s: float,
        execute_s: float,
        start_s: float | None = None,
    ) -> None:
        if batch.is_empty:
            return
        self._records.append(StepRecord(StepShape.of(batch), duration_s, execute_s, start_s))

    def records(self) -> list[StepRecord]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

"""Messages between the controller and the instance processes (multiprocessing Pipes).

Small slots dataclasses of plain types (ints, floats, strings, lists), pickled by the
pipe; never a tensor: KV bytes move directly between the instances' pools. Times are
``time.monotonic()`` seconds, comparable across processes (Linux CLOCK_MONOTONIC is
system-wide).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve_rt.core.stop_checker import FinishReason
from distserve_rt.logprobs import Logprob
from distserve_rt.sampling_params import SamplingParams

# ---- controller -> instance ----------------------------------------------------------------


@dataclass(slots=True)
class NewRequest:
    """Prefill this request (to a prefill instance; to a decode instance when it prefills
    locally, conditional disaggregation). ``token_ids`` = prompt + tokens already generated
    (non-empty only when retried: they are prefilled too)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    arrival_time: float


@dataclass(slots=True)
class Migrate:
    """Pull this request's KV from prefill instance `prefill_index` (to a decode instance)."""

    request_id: str
    prefill_index: int
    block_ids: list[int]
    """The prefill pool's blocks holding the KV of ``token_ids[:-1]``."""
    token_ids: list[int]
    """Prompt + generated tokens; the last one's KV is computed by the first decode step."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    arrival_time: float
    generator_state: bytes | None = None
    """Seeded requests: the prefill sampler's `torch.Generator.get_state()` bytes, so the
    decode instance continues the same random stream (seeded outputs equal colocated)."""


@dataclass(slots=True)
class ReleaseKV:
    """The KV of this request will not be read (pulled, given up, or its reader died): free
    its blocks (to the prefill instance that announced it)."""

    request_id: str


@dataclass(slots=True)
class Revoke:
    """The lease expired: drop the migration if its pull has not started (to decode)."""

    request_id: str


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class PeerPools:
    """The prefill instances' pool descriptors (to decode instances, once at start-up)."""

    descriptors: dict[int, list]
    """Prefill instance index -> one descriptor per rank (`Ready.pool_descriptors`), or
    per decode rank a descriptor per prefill rank (`transfer.per_pair.RankDescriptors`)."""


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class StepLogControl:
    """Starts the instance's step log (``capacity`` > 0: its last steps, emptied), or with
    0 stops it and asks for what it holds (a `StepLogRecords` reply)."""

    capacity: int


# ---- instance -> controller ----------------------------------------------------------------


@dataclass(slots=True)
class Ready:
    name: str
    model_config: object
    """`ModelConfig` of the loaded model (plain dataclass)."""
    num_blocks: int
    pool_descriptors: list[bytes] | None = None
    """Prefill instances: their pools' `PoolDescriptor.to_bytes()`, one per rank in rank
    order (``pp_rank * tp + tp_rank``)."""


@dataclass(slots=True)
class PeersOpened:
    """A decode instance mapped every prefill pool (`PeerPools`): it can pull from now on."""

    name: str


@dataclass(slots=True)
class Tokens:
    """New tokens of a request (and its end, when `finish_reason` is set)."""

    request_id: str
    token_ids: list[int]
    time: float
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    first_decode_time: float | None = None
    """Decode instances: when its first decode step started (the decode queue ends)."""
    logprobs: list[dict[int, Logprob]] | None = None
    """Per token of `token_ids` (SamplingParams.logprobs set): {token id: Logprob}."""


@dataclass(slots=True)
class PrefillDone:
    """A prefill produced the request's next token; its KV awaits migration unless
    `finish_reason` is set (it stopped at its first token and holds no KV any more)."""

    request_id: str
    token_id: int
    time: float
    prefill_start_time: float
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: dict[int, Logprob] | None = None
    """The first token's {token id: Logprob} (SamplingParams.logprobs set)."""
    generator_state: bytes | None = None
    """Seeded requests: the generator state after sampling the first token."""


@dataclass(slots=True)
class MigrationDone:
    """A decode instance is done with a migration's source KV (the controller forwards it
    to the prefill instance as `ReleaseKV`)."""

    request_id: str
    prefill_index: int
    ok: bool
    pull_start_time: float
    pull_end_time: float
    num_bytes: int = 0
    error: str | None = None
    num_blocks_pulled: int = 0
    """Blocks copied from the prefill pool (0 unless ok)."""
    num_blocks_reused: int = 0
    """Leading blocks found in the decode instance's prefix cache, not copied."""


@dataclass(slots=True)
class LeaseExpired:
    request_id: str


@dataclass(slots=True)
class RevokeResult:
    request_id: str
    prefill_index: int
    """The prefill instance holding the KV (freed by the controller when revoked)."""
    revoked: bool
    """True: dropped before any pull (the KV may be reused); False: the pull is under way or
    done and a `MigrationDone` follows (or already went out)."""


@dataclass(slots=True)
class InstanceStatus:
    """Periodic load report."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    kv_usage: float
    num_transfers: int = 0
    num_transfer_failures: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_blocks_pulled: int = 0
    """Decode instances: KV blocks their migrations copied, since start."""
    num_blocks_reused: int = 0
    """Decode instances: migrated blocks found in their prefix cache instead, since start."""
    num_local_prefills: int = 0
    """Decode instances: requests they prefilled themselves (conditional disaggregation)."""


@dataclass(slots=True)
class StepLogRecords:
    """The instance's step log when it was stopped (`StepLogControl(0)`), oldest first:
    `engine.step_log.StepRecord.to_dict` of each executed step."""

    records: list[dict]


@dataclass(slots=True)
class Fatal:
    """The instance loop raised; the process exits after sending this."""

    error: str

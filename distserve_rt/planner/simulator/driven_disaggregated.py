"""Disaggregated serving simulated by driving the runtime's own schedulers (see
driven_instance): N prefill instances (`PrefillScheduler`), M decode instances
(`DecodeScheduler`), the controller's dispatch rules (`core.dispatch`) and pull-based KV
migration between them, on a simulated clock.

What mirrors what:

* arrival → the prefill instance with the fewest queued prompt tokens (a request's tokens
  count until its prefill ends, as the controller's ``num_queued_tokens``);
* a prefill step's first tokens: the scheduler starts the migration (KV held, blocks
  busy) and the request is announced to the least-loaded decode instance (fewest assigned
  requests, ties most free blocks), whose `DecodeScheduler.add_migrated` queues it;
* at the start of each decode step (as `DecodeInstance.step`) `admit_migrations` allocates
  blocks for the pulls that fit; each pull takes `KVTransferSpec.seconds(prompt tokens)`,
  serialised on the decode instance's inbound link; when it lands, `complete_migration`
  (it decodes from the next step) and the prefill side's `release_migration` frees the
  source blocks (what the controller's ReleaseKV does).

Events at one time are all applied before any idle instance steps, so a burst of arrivals
forms one batch, as the colocated loop does.

`run_conversations` (token ids real, prefix caching on) also models what the runtime does
with the cache (`engine/controller.py`, `engine/disagg/decode_instance.py`), through the
same code: the decode instances' pools cache too (`DecodeScheduler.admit_migrations` shares
the cached leading blocks, and the pull, its time from the tokens of the blocks it moves,
skips them); a request goes to the decode instance the controller's `DecodePrefixIndex`
picks (`core.cache_routing.pick_decode_instance`, ``max_decode_load_imbalance``); and
`core.cache_routing.prefill_locally` sends a request straight to a decode instance, whose
scheduler prefills it there (decode-instance time), when the DisaggConfig thresholds say so.

`DisaggSpec.hops` adds the time between processes no step shows: a request enters a prefill
instance's queue ``dispatch_s`` after it arrived, and every token reaches the controller
``token_s`` after its step (TTFT includes it).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import numpy as np

from distserve_rt.config.disagg import DisaggConfig
from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.cache_routing import prefill_locally
from distserve_rt.core.dispatch import decode_load, pick_prefill
from distserve_rt.core.request import Request, RequestStatus
from distserve_rt.core.scheduler import DecodeScheduler, PrefillScheduler, SchedulerOutput
from distserve_rt.planner.simulator.conversations import (
    ConversationArrivals,
    ConversationSimResult,
    context_len,
)
from distserve_rt.planner.simulator.driven_instance import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_WATERMARK,
    StepClock,
    StepNoise,
    check_lengths,
    check_pp1,
    make_block_manager,
    make_request,
    make_scheduler_config,
    migrated_copy,
    next_batch,
    resolve_max_model_len,
    sampled_tokens,
)
from distserve_rt.planner.simulator.results import SimResult
from distserve_rt.planner.simulator.spec import DisaggSpec
from distserve_rt.workloads.multi_turn import MultiTurnWorkload

_INF = float("inf")
_ARRIVAL, _PREFILL_END, _DECODE_END, _PULL_DONE, _TURNS = range(5)


class _Prefill:
    __slots__ = ("sched", "clock", "busy", "num_queued_tokens")

    def __init__(self, sched: PrefillScheduler, clock: StepClock) -> None:
        self.sched = sched
        self.clock = clock
        self.busy = False
        self.num_queued_tokens = 0


class _Decode:
    __slots__ = (
        "sched", "clock", "busy", "link_free", "num_assigned", "step_start",
        "num_blocks_pulled", "num_blocks_reused", "num_local_prefills", "reused_blocks",
    )  # fmt: skip

    def __init__(self, sched: DecodeScheduler, clock: StepClock) -> None:
        self.sched = sched
        self.clock = clock
        self.busy = False
        self.link_free = 0.0
        """When the inbound link finishes its last queued pull (s)."""
        self.num_assigned = 0
        self.step_start: dict[float, float] = {}
        """Step end -> its start: a request's decode starts with the step of its first
        token here (looked up at the end, instead of scanning every step's decodes)."""
        self.num_blocks_pulled = 0
        self.num_blocks_reused = 0
        """`DecodeInstance`'s counters: of the migrations that landed, blocks copied and
        blocks found in this pool's prefix cache."""
        self.num_local_prefills = 0
        """Requests sent here to be prefilled (conditional disaggregation)."""
        self.reused_blocks: dict[str, int] = {}  # pulls in flight: blocks not pulled


class SchedulerDrivenDisaggregated:
    """Simulate ``spec`` (pp=1 instances) with the runtime's prefill and decode schedulers.

    Args are those of `SchedulerDrivenColocated` (block_size, watermark, max_model_len,
    noise, seed, wake), for every instance; each instance draws its noise from its own stream.
    """

    def __init__(
        self,
        spec: DisaggSpec,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        watermark: float = DEFAULT_WATERMARK,
        max_model_len: int | None = None,
        noise: StepNoise | None = None,
        seed: int = 0,
        wake: Callable[[float], float] | None = None,
    ) -> None:
        check_pp1(spec.prefill, "prefill")
        self.wake = wake
        check_pp1(spec.decode, "decode")
        self.spec = spec
        self.block_size = block_size
        self.watermark = watermark
        self.max_model_len = max_model_len
        self.noise = noise
        self.seed = seed
        self.block_managers: list[BlockManager] = []
        """The last run's pools, prefill instances first (tests check they end empty)."""
        self.num_preemptions = 0
        """Preemptions by recompute on the decode instances in the last run."""

    def run(self, arrival, prompt_lens, output_lens) -> SimResult:
        """Arrays ``[num_requests]`` in arrival order (s, tokens, tokens)."""
        arrival, prompt, out = check_lengths(arrival, prompt_lens, output_lens)
        self._max_len = resolve_max_model_len(self.max_model_len, prompt, out)
        self._build_instances()
        n = arrival.size
        self._requests = [
            make_request(i, prompt[i], out[i], float(arrival[i]), self._max_len) for i in range(n)
        ]
        self._decoded: list[Request | None] = [None] * n
        self._owner = [0] * n
        self._ts, self._te = ([_INF] * n for _ in range(2))
        self._decoded_by = [0] * n
        self._local = [False] * n
        self._seq = n
        self._source = None
        self._dc = DisaggConfig()
        self._prefixes = None
        # A request reaches a prefill instance's queue one controller hop after it arrived.
        dispatch = self.spec.hops.dispatch_s
        self._events = [
            (float(t) + dispatch, i, _ARRIVAL, i, None) for i, t in enumerate(arrival.tolist())
        ]
        heapq.heapify(self._events)
        self._loop()
        return self._result(arrival, out)

    def run_conversations(
        self,
        workload: MultiTurnWorkload,
        *,
        prefix_caching: bool = True,
        disagg_config: DisaggConfig | None = None,
    ) -> ConversationSimResult:
        """Replay ``workload``'s conversations closed loop (see `conversations`).

        ``prefix_caching`` is `EngineConfig.enable_prefix_caching`: the prefill instances'
        pools cache (a turn's prefill skips its cached prefix), and with
        ``disagg_config.decode_prefix_caching`` (default on, as `DisaggConfig`'s) the
        decode instances' too, with cache-aware routing and delta pulls; the
        ``disagg_config.local_prefill_*`` thresholds turn conditional disaggregation on.
        Every rule is the runtime's own (see the module docstring)."""
        dc = DisaggConfig() if disagg_config is None else disagg_config
        if not isinstance(dc, DisaggConfig):
            raise ValueError(
                f"disagg_config must be a DisaggConfig or None, got {type(dc).__name__}"
            )
        self._max_len = context_len(workload, self.max_model_len)
        self._dc = dc
        decode_caching = prefix_caching and dc.decode_prefix_caching
        self._build_instances(prefix_caching, decode_caching)
        self._prefixes = None
        if decode_caching:
            # The controller's own view of the decode caches (imported here: the engine
            # package pulls in torch, which the length-only simulations never need).
            from distserve_rt.engine.disagg.routing import DecodePrefixIndex

            self._prefixes = DecodePrefixIndex(
                {d: inst.sched.block_manager.num_blocks for d, inst in enumerate(self._decodes)},
                self.block_size,
            )
        self._requests, self._decoded, self._owner = [], [], []
        self._ts, self._te, self._decoded_by, self._local = [], [], [], []
        self._seq = 0
        self._events = []
        self._source = source = ConversationArrivals(workload, self._max_len)
        self._push(source.next_arrival(), _TURNS, None)
        self._loop()
        requests = source.requests
        arrival = np.asarray([r.arrival_time for r in requests], dtype=np.float64)
        out = [r.sampling_params.max_tokens for r in requests]
        return source.result(
            self._result(arrival, out),
            self.block_managers,
            num_blocks_pulled=sum(d.num_blocks_pulled for d in self._decodes),
            num_blocks_reused=sum(d.num_blocks_reused for d in self._decodes),
            num_local_prefills=sum(d.num_local_prefills for d in self._decodes),
        )

    def _on_turns(self, now, _a, _b, dirty_p, dirty_d) -> None:
        for request in self._source.pop_due(now):
            for values in (self._decoded, self._ts, self._te):
                values.append(None if values is self._decoded else _INF)
            self._owner.append(0)
            self._decoded_by.append(0)
            self._local.append(False)
            self._requests.append(request)
            if self.spec.hops.dispatch_s > 0:  # one controller hop to an instance's queue
                self._push(now + self.spec.hops.dispatch_s, _ARRIVAL, request.seq_id)
            else:
                self._on_arrival(now, request.seq_id, None, dirty_p, dirty_d)

    def _finished(self, requests: list[Request]) -> None:
        """Closed loop: the next turns of finished requests' conversations arrive later."""
        if self._source is None or not requests:
            return
        self._source.finished(requests)
        for request in requests:
            if request.status is not RequestStatus.FINISHED_ERROR:
                # One event per queued turn; an event that finds no turn due does nothing.
                self._push(self._source.next_arrival(), _TURNS, None)

    def _build_instances(self, prefix_caching: bool = False, decode_caching: bool = False) -> None:
        spec, rngs = (
            self.spec,
            np.random.default_rng(self.seed).spawn(self.spec.num_prefill + self.spec.num_decode),
        )
        self.block_managers = []
        self.num_preemptions = 0

        def parts(inst_spec, rng, loop_s, caching=False):
            bm = make_block_manager(
                inst_spec, self.block_size, self.watermark, prefix_caching=caching
            )
            self.block_managers.append(bm)
            config = make_scheduler_config(inst_spec, self._max_len)
            return config, bm, StepClock(inst_spec.latency, self.noise, rng, self.wake, loop_s)

        hops = spec.hops
        self._prefills = []
        for k in range(spec.num_prefill):
            config, bm, clock = parts(spec.prefill, rngs[k], hops.prefill_loop_s, prefix_caching)
            self._prefills.append(_Prefill(PrefillScheduler(config, bm), clock))
        self._decodes = []
        for k in range(spec.num_decode):
            rng = rngs[spec.num_prefill + k]
            config, bm, clock = parts(spec.decode, rng, hops.decode_loop_s, decode_caching)
            self._decodes.append(_Decode(DecodeScheduler(config, bm), clock))

    def _push(self, time: float, kind: int, a, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, kind, a, b))

    def _loop(self) -> None:
        events = self._events
        handlers = (
            self._on_arrival,
            self._on_prefill_end,
            self._on_decode_end,
            self._on_pull,
            self._on_turns,
        )
        while events:
            now = events[0][0]
            dirty_p: set[int] = set()
            dirty_d: set[int] = set()
            while events and events[0][0] == now:
                _, _, kind, a, b = heapq.heappop(events)
                handlers[kind](now, a, b, dirty_p, dirty_d)
            for p in sorted(dirty_p):
                self._step_prefill(now, p)
            for d in sorted(dirty_d):
                self._step_decode(now, d)
        stuck = [r.request_id for r in self._requests if not self._is_done(r)]
        if stuck:
            raise RuntimeError(f"requests {stuck[:5]} never finished: the simulation stalled")

    def _is_done(self, request: Request) -> bool:
        if request.is_finished:
            return True
        decoded = self._decoded[request.seq_id]
        return decoded is not None and decoded.is_finished

    # ---- prefill ----------------------------------------------------------------------------

    def _on_arrival(self, now, i: int, _, dirty_p, dirty_d) -> None:
        request = self._requests[i]
        if self._prefill_on_decode(request, dirty_d):
            return
        p = pick_prefill([inst.num_queued_tokens for inst in self._prefills])
        inst = self._prefills[p]
        self._owner[i] = p
        inst.num_queued_tokens += request.num_prompt_tokens
        inst.sched.add_request(request)
        dirty_p.add(p)

    def _prefill_on_decode(self, request: Request, dirty_d) -> bool:
        """`Controller._prefill_on_decode`: conditional disaggregation by `prefill_locally`
        (False, the request goes to a prefill instance, when the thresholds are off)."""
        dc = self._dc
        if not (dc.local_prefill_max_tokens or dc.local_prefill_min_queue_tokens):
            return False
        token_ids = request.token_ids
        d, num_cached_blocks = self._route_decode(token_ids)
        num_uncached = len(token_ids) - num_cached_blocks * self.block_size
        num_queued = min(inst.num_queued_tokens for inst in self._prefills)
        target = self._decodes[d]
        if not prefill_locally(
            num_uncached, num_queued, max_uncached_tokens=dc.local_prefill_max_tokens,
            min_prefill_queue_tokens=dc.local_prefill_min_queue_tokens,
            num_prompt_tokens=len(token_ids),
            max_num_batched_tokens=target.sched.config.max_num_batched_tokens,
        ):  # fmt: skip
            return False
        target.num_assigned += 1
        target.num_local_prefills += 1
        self._record_decode_prefix(d, token_ids)
        self._local[request.seq_id] = True
        self._decoded_by[request.seq_id] = d
        target.sched.add_request(request)  # prefilled by the decode scheduler, prefill-first
        dirty_d.add(d)
        return True

    def _route_decode(self, token_ids: list[int]) -> tuple[int, int]:
        """`Controller.route_decode`: the decode instance for a request of ``token_ids``
        (its KV: all but the last) and the blocks of it that instance likely holds."""
        if self._prefixes is None:
            return min(range(len(self._decodes)), key=self._decode_key), 0
        hashes = self._prefixes.block_hashes(token_ids[:-1])
        decodes = self._decodes
        return self._prefixes.pick(
            range(len(decodes)), hashes, [inst.num_assigned for inst in decodes],
            [inst.sched.block_manager.num_free_blocks for inst in decodes],
            self._dc.max_decode_load_imbalance,
        )  # fmt: skip

    def _record_decode_prefix(self, d: int, token_ids: list[int]) -> None:
        """`Controller._record_decode_prefix`: instance ``d`` will hold ``token_ids[:-1]``."""
        if self._prefixes is not None:
            self._prefixes.record(d, self._prefixes.block_hashes(token_ids[:-1]))

    def _step_prefill(self, now: float, p: int) -> None:
        inst = self._prefills[p]
        if inst.busy:
            return
        out, finished, _ = next_batch(inst.sched, now)
        for request in finished:  # rejected: never fits this pool
            inst.num_queued_tokens -= request.num_prompt_tokens
        if not out.is_empty:
            inst.busy = True
            self._push(now + inst.clock.seconds(out, now), _PREFILL_END, p, out)

    def _on_prefill_end(self, now, p: int, out: SchedulerOutput, dirty_p, dirty_d) -> None:
        inst = self._prefills[p]
        inst.busy = False
        dirty_p.add(p)
        update = inst.sched.update_from_output(out, sampled_tokens(out), None, now)
        for request in update.updated:
            inst.num_queued_tokens -= request.num_prompt_tokens
            if request.is_finished:
                self._finished([request])
                continue  # a one-token output: done at its first token
            decoded = migrated_copy(request, self._max_len)
            d, _ = self._route_decode(decoded.token_ids)
            target = self._decodes[d]
            target.num_assigned += 1
            self._record_decode_prefix(d, decoded.token_ids)
            self._decoded[request.seq_id] = decoded
            self._decoded_by[request.seq_id] = d
            target.sched.add_migrated(decoded)
            dirty_d.add(d)

    def _decode_key(self, d: int) -> tuple[int, int]:
        inst = self._decodes[d]
        return decode_load(inst.num_assigned, inst.sched.block_manager.num_free_blocks)

    # ---- KV migration and decode ------------------------------------------------------------

    def _step_decode(self, now: float, d: int) -> None:
        """`DecodeInstance.step`: admit the migrations that fit (their pulls start), then
        the batch; again while a batch is empty but preempted or rejected a request (the
        admission may have waited for that queue), as the instance's loop would."""
        inst = self._decodes[d]
        if inst.busy:
            return
        while True:
            self._start_pulls(now, d)
            out, finished, num_preempted = next_batch(inst.sched, now)
            self.num_preemptions += num_preempted
            for request in finished:  # rejected: never fits this pool
                inst.num_assigned -= 1
                p = self._owner[request.seq_id]
                if self._prefills[p].sched.release_migration(request.request_id) is not None:
                    self._step_prefill(now, p)  # its source blocks are free
            if not out.is_empty:
                break
            if not (finished or num_preempted):
                return
        inst.busy = True
        end = now + inst.clock.seconds(out, now)
        inst.step_start[end] = now
        self._push(end, _DECODE_END, d, out)

    def _start_pulls(self, now: float, d: int) -> None:
        """Pulls start for the admitted migrations, each moving only the blocks this pool
        lacks (`DecodeInstance._start_pull`): its time is that of their tokens."""
        inst, transfer = self._decodes[d], self.spec.kv_transfer
        for request in inst.sched.admit_migrations(now):
            reused_tokens = inst.sched.reused_tokens[request.request_id]
            inst.reused_blocks[request.request_id] = reused_tokens // self.block_size
            start = max(now, inst.link_free)
            num_tokens = request.num_computed_tokens - reused_tokens
            inst.link_free = end = start + transfer.seconds(num_tokens)
            self._ts[request.seq_id] = start
            self._push(end, _PULL_DONE, d, request)

    def _on_pull(self, now, d: int, request: Request, dirty_p, dirty_d) -> None:
        inst = self._decodes[d]
        reused = inst.reused_blocks.pop(request.request_id)
        # The prefill side's block list, as the Migrate announced it, less the cached ones.
        num_blocks = math.ceil(request.num_computed_tokens / self.block_size)
        inst.num_blocks_reused += reused
        inst.num_blocks_pulled += num_blocks - reused
        inst.sched.complete_migration(request)
        self._te[request.seq_id] = now
        p = self._owner[request.seq_id]
        self._prefills[p].sched.release_migration(request.request_id)
        dirty_p.add(p)
        dirty_d.add(d)

    def _on_decode_end(self, now, d: int, out: SchedulerOutput, dirty_p, dirty_d) -> None:
        inst = self._decodes[d]
        inst.busy = False
        update = inst.sched.update_from_output(out, sampled_tokens(out), None, now)
        inst.num_assigned -= len(update.finished)
        for request in update.finished:
            if request.status is not RequestStatus.FINISHED_ERROR:
                # `Controller.finish`: it keeps every full block it computed, output too.
                self._record_decode_prefix(d, request.token_ids)
        self._finished(update.finished)
        dirty_d.add(d)

    # ---- result -----------------------------------------------------------------------------

    def _result(self, arrival: np.ndarray, out: list[int]) -> SimResult:
        n = arrival.size
        ps, pe, ds, fin = ([_INF] * n for _ in range(4))
        ts, te = self._ts, self._te
        failed = RequestStatus.FINISHED_ERROR
        for k, r in enumerate(self._requests):
            decoded = self._decoded[k]
            if r.status is failed or (decoded is not None and decoded.status is failed):
                continue  # never fit a pool: misses every SLO
            ps[k] = r.first_scheduled_time
            pe[k] = r.first_token_time
            if self._local[k]:  # prefilled on its decode instance: nothing moved
                ts[k] = te[k] = ds[k] = pe[k]
                fin[k] = r.finished_time
            elif decoded is None:  # one-token output
                ts[k] = te[k] = ds[k] = fin[k] = pe[k]
            else:
                step_start = self._decodes[self._decoded_by[k]].step_start
                ds[k] = step_start[decoded.token_times[0]]
                fin[k] = decoded.finished_time
        return SimResult(
            arrival,
            np.asarray(ps),
            np.asarray(pe),
            np.asarray(ts),
            np.asarray(te),
            np.asarray(ds),
            np.asarray(fin),
            np.asarray(out, dtype=np.int64),
            token_delay_s=self.spec.hops.token_s,
        )

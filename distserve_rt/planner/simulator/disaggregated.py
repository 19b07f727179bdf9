"""Discrete-event simulation of disaggregated serving: prefill instances → KV pull → decode.

Policies, and the runtime piece each mirrors (so a sim-vs-runtime comparison measures the
latency model, not a policy mismatch):

* **Dispatch to prefill** (controller): the instance with the fewest queued prompt tokens
  (ties: lowest index). The architecture's "shortest queue", counted in tokens because a
  queue of long prompts is longer work.
* **Prefill instance** (disaggregated PrefillScheduler): FCFS; a batch takes queued prompts
  in order while their total stays ≤ L_m (``max_batch_tokens``; a longer prompt runs alone),
  and only while the prompts' KV fits the instance's pool, which also holds finished
  prompts until a decode instance pulls them (the prefill pool is the queue buffer). With
  PP = k a new batch enters stage 0 as soon as stage 0 is free: up to k batches in flight.
  The first token is out when the last stage finishes (TTFT ends there).
* **Dispatch to decode** (controller): the decode instance with the least load, load =
  tokens reserved by its requests + tokens waiting to be pulled by it.
* **KV transfer** (pull-based transfer engine): each decode instance pulls waiting requests
  FIFO when it can reserve ``prompt + output`` tokens and has a free seat
  (``max_num_seqs``); its pulls are serialised on its inbound link and take
  `KVTransferSpec.seconds`. The reservation covers the whole output, so a decode instance
  never preempts (the runtime's DecodeScheduler may admit on the prompt alone and preempt
  later; with forced output lengths this is the difference to look for in a comparison).
* **Decode instance** (DecodeScheduler, continuous batching): every step advances all
  running requests by one token; a pulled request joins at the next step boundary; with
  PP = k, k micro-batches (lanes), a new request going to the lane with fewest requests.

A request that can never fit (prompt > prefill pool, prompt+output > decode pool) is
marked failed: ``inf`` timestamps, which miss every SLO.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np

from distserve_rt.planner.simulator.decode_lane import DecodeLane
from distserve_rt.planner.simulator.results import SimResult
from distserve_rt.planner.simulator.spec import DisaggSpec, SimInstanceSpec, SimMode

_ARRIVAL, _STAGE0_FREE, _PREFILL_DONE, _TRANSFER_DONE, _LANE = range(5)
_INF = float("inf")


class _Prefill:
    __slots__ = ("spec", "queue", "queued_tokens", "stage_free", "mem_used")

    def __init__(self, spec: SimInstanceSpec) -> None:
        self.spec = spec
        self.queue: deque[int] = deque()
        self.queued_tokens = 0
        self.stage_free = [0.0] * spec.parallelism.pp_size
        self.mem_used = 0


class _Decode:
    __slots__ = ("spec", "lanes", "pulls", "load", "reserved", "num_seats", "link_free")

    def __init__(self, spec: SimInstanceSpec, affine) -> None:
        self.spec = spec
        self.lanes = [DecodeLane(affine) for _ in range(spec.parallelism.pp_size)]
        self.pulls: deque[int] = deque()
        self.load = 0
        self.reserved = 0
        self.num_seats = 0
        self.link_free = 0.0


def _decode_affine(spec: SimInstanceSpec):
    """batch -> (alpha, beta) of one lane step, hops included, memoised per batch size."""
    cache: dict[int, tuple[float, float]] = {}
    lat, pipe, num_hops = spec.latency, spec.pipeline, spec.parallelism.pp_size - 1

    def affine(batch: int) -> tuple[float, float]:
        got = cache.get(batch)
        if got is None:
            alpha, beta = lat.decode_affine(batch)
            alpha, beta = spec.step_overhead.decode_affine(batch, alpha, beta)
            got = cache[batch] = (alpha + num_hops * pipe.hop_s(batch), beta)
        return got

    return affine


class DisaggregatedSimulator:
    """Simulate ``spec`` on requests with ``prompt_lens``/``output_lens`` arriving at ``arrival``.

    Arrays are ``[num_requests]``: tokens (int) and seconds (float, non-decreasing).
    """

    def __init__(self, spec: DisaggSpec, mode: SimMode = SimMode.FULL) -> None:
        if not spec.hops.is_zero:
            raise ValueError(
                f"hops={spec.hops}: the fast disaggregated simulator does not model the time "
                "between processes; use the scheduler-driven one (SchedulerDrivenDisaggregated)"
            )
        self.spec = spec
        self.mode = SimMode(mode)

    def run(self, arrival, prompt_lens, output_lens) -> SimResult:
        self._setup(arrival, prompt_lens, output_lens)
        events = self._events
        while events:
            time, _, kind, a, b = heapq.heappop(events)
            self._handlers[kind](time, a, b)
        return self._result()

    # ---- set-up and result ---------------------------------------------------------------

    def _setup(self, arrival, prompt_lens, output_lens) -> None:
        spec = self.spec
        self._arrival = np.asarray(arrival, dtype=np.float64)
        self._out_arr = np.asarray(output_lens, dtype=np.int64)
        self._prompt = [int(x) for x in prompt_lens]
        self._out = self._out_arr.tolist()
        n = len(self._prompt)
        if not (self._arrival.size == n == len(self._out)):
            raise ValueError("arrival, prompt_lens and output_lens must have one length")
        self._ts = {k: [_INF] * n for k in ("ps", "pe", "ts", "te", "ds", "fin")}
        self._owner = [0] * n  # prefill instance holding the request's KV
        self._prefills = [_Prefill(spec.prefill) for _ in range(spec.num_prefill)]
        affine = _decode_affine(spec.decode)
        self._decodes = [_Decode(spec.decode, affine) for _ in range(spec.num_decode)]
        self._seq = 0
        self._handlers = (
            self._on_arrival,
            self._on_stage0_free,
            self._on_prefill_done,
            self._on_transfer_done,
            self._on_lane,
        )
        self._events = [(float(t), i, _ARRIVAL, i, None) for i, t in enumerate(self._arrival)]
        heapq.heapify(self._events)
        self._seq = n

    def _push(self, time: float, kind: int, a, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, kind, a, b))

    def _result(self) -> SimResult:
        ts = {k: np.asarray(v) for k, v in self._ts.items()}
        return SimResult(
            self._arrival,
            ts["ps"],
            ts["pe"],
            ts["ts"],
            ts["te"],
            ts["ds"],
            ts["fin"],
            self._out_arr,
        )

    def _fail(self, req: int) -> None:
        for key in ("pe", "fin"):
            self._ts[key][req] = _INF

    # ---- prefill -------------------------------------------------------------------------

    def _on_arrival(self, now: float, req: int, _) -> None:
        if self.mode is SimMode.DECODE_ONLY:
            # Arrives prefilled: its first token is out, so a one-token output is finished
            # (as in `_on_prefill_done`), not held in a decode seat until a step boundary.
            done = self._out[req] == 1
            keys = ("ps", "pe", "ts", "te", "ds", "fin") if done else ("ps", "pe", "ts", "te")
            for key in keys:
                self._ts[key][req] = now
            if not done:
                self._to_decode(now, req, transfer=False)
            return
        p = min(range(len(self._prefills)), key=lambda i: self._prefills[i].queued_tokens)
        inst = self._prefills[p]
        if self._prompt[req] > inst.spec.kv_capacity_tokens:
            self._fail(req)
            return
        self._owner[req] = p
        inst.queue.append(req)
        inst.queued_tokens += self._prompt[req]
        self._try_prefill(now, p)

    def _on_stage0_free(self, now: float, p: int, _) -> None:
        self._try_prefill(now, p)

    def _try_prefill(self, now: float, p: int) -> None:
        inst = self._prefills[p]
        if not inst.queue or inst.stage_free[0] > now:
            return
        spec, prompt = inst.spec, self._prompt
        batch, num_tokens, sum_sq = [], 0, 0
        free_mem = spec.kv_capacity_tokens - inst.mem_used
        while inst.queue:
            length = prompt[inst.queue[0]]
            if batch and num_tokens + length > spec.max_batch_tokens:
                break
            if num_tokens + length > free_mem:
                break  # wait for decode instances to pull finished prompts
            batch.append(inst.queue.popleft())
            num_tokens += length
            sum_sq += length * length
        if not batch:
            return
        inst.queued_tokens -= num_tokens
        inst.mem_used += num_tokens
        num_stages = spec.parallelism.pp_size
        stage_s = spec.latency.prefill_s(num_tokens, sum_sq) / num_stages
        # The first stage also schedules and launches the batch: it alone pays the overhead.
        stage0_s = stage_s + spec.step_overhead.seconds(num_tokens)
        hop = spec.pipeline.hop_s(num_tokens)
        enter = now
        for j in range(num_stages):
            busy = stage0_s if j == 0 else stage_s
            start = max(enter, inst.stage_free[j])
            inst.stage_free[j] = start + busy
            enter = start + busy + hop
        end = inst.stage_free[-1]
        start0 = inst.stage_free[0] - stage0_s
        for req in batch:
            self._ts["ps"][req] = start0
        self._push(inst.stage_free[0], _STAGE0_FREE, p)
        self._push(end, _PREFILL_DONE, p, batch)

    def _on_prefill_done(self, now: float, p: int, batch: list[int]) -> None:
        ts = self._ts
        for req in batch:
            ts["pe"][req] = now
            if self._out[req] == 1 or self.mode is SimMode.PREFILL_ONLY:
                for key in ("ts", "te", "ds", "fin"):
                    ts[key][req] = now
                self._release_prefill(now, req)
            else:
                self._to_decode(now, req, transfer=True)

    def _release_prefill(self, now: float, req: int) -> None:
        p = self._owner[req]
        self._prefills[p].mem_used -= self._prompt[req]
        self._try_prefill(now, p)

    # ---- KV transfer ---------------------------------------------------------------------

    def _to_decode(self, now: float, req: int, transfer: bool) -> None:
        d = min(range(len(self._decodes)), key=lambda i: self._decodes[i].load)
        inst = self._decodes[d]
        need = self._prompt[req] + self._out[req]
        if need > inst.spec.kv_capacity_tokens:
            self._fail(req)
            if transfer:
                self._release_prefill(now, req)
            return
        inst.pulls.append(req)
        inst.load += need
        self._try_pull(now, d)

    def _try_pull(self, now: float, d: int) -> None:
        inst = self._decodes[d]
        cap, seats = inst.spec.kv_capacity_tokens, inst.spec.max_num_seqs
        while inst.pulls:
            req = inst.pulls[0]
            need = self._prompt[req] + self._out[req]
            if inst.reserved + need > cap or inst.num_seats >= seats:
                return
            inst.pulls.popleft()
            inst.reserved += need
            inst.num_seats += 1
            if self.mode is SimMode.DECODE_ONLY:
                self._on_transfer_done(now, req, d)
                continue
            start = max(now, inst.link_free)
            inst.link_free = end = start + self.spec.kv_transfer.seconds(self._prompt[req])
            self._ts["ts"][req] = start
            self._push(end, _TRANSFER_DONE, req, d)

    def _on_transfer_done(self, now: float, req: int, d: int) -> None:
        self._ts["te"][req] = now
        if self.mode is not SimMode.DECODE_ONLY:
            self._release_prefill(now, req)
        lane_id = min(
            range(len(self._decodes[d].lanes)),
            key=lambda i: self._decodes[d].lanes[i].B + len(self._decodes[d].lanes[i].pending),
        )
        self._join(now, d, lane_id, req)

    # ---- decode --------------------------------------------------------------------------

    def _join(self, now: float, d: int, lane_id: int, req: int) -> None:
        lane = self._decodes[d].lanes[lane_id]
        lane.pending.append(req)
        steps = lane.steps_until(now)
        if lane.B == 0:
            lane.t0 = max(lane.t0, now)
        if steps == 0:
            self._on_lane(lane.t0, (d, lane_id), (lane.version, lane.n))
        else:
            self._push(
                lane.t0 + lane.duration(steps), _LANE, (d, lane_id), (lane.version, lane.n + steps)
            )

    def _on_lane(self, now: float, where: tuple[int, int], target: tuple[int, int]) -> None:
        d, lane_id = where
        inst = self._decodes[d]
        lane = inst.lanes[lane_id]
        version, step = target
        if version != lane.version:
            return
        lane.advance(step - lane.n)
        lane.t0 = now  # exact boundary time (avoids float drift of the closed form)
        ts = self._ts
        freed = False
        for req in lane.pop_finished():
            ts["fin"][req] = now
            need = self._prompt[req] + self._out[req]
            inst.reserved -= need
            inst.load -= need
            inst.num_seats -= 1
            freed = True
        for req in lane.pending:
            ts["ds"][req] = now
            lane.add(req, self._prompt[req], self._out[req] - 1)
        lane.pending.clear()
        lane.version += 1
        nxt = lane.next_finish()
        if nxt is not None:
            self._push(nxt[0], _LANE, where, (lane.version, nxt[1]))
        if freed:
            self._try_pull(now, d)

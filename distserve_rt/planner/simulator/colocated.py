"""Colocated baselines: one instance runs both phases (PP = 1).

* ``continuous_batching`` mirrors the runtime's `ContinuousBatchingScheduler` (vLLM v0's
  default, prefill first): at every step boundary, if waiting requests fit (token budget
  ``max_batch_tokens``, ``max_num_seqs``, KV), the step is a prefill-only batch of them in
  arrival order; otherwise one decode step for every running request.
* ``chunked_prefill`` mirrors `ChunkedPrefillScheduler` (Sarathi-Serve / DeepSpeed-MII): each
  step has a budget of ``max_batch_tokens`` tokens; every running decode takes one, the rest
  goes to prefill chunks, the partially prefilled request first, then new ones FCFS. A
  request's first token comes at the end of its last chunk. Step time is
  `LatencyModel.mixed_s`.

Admission reserves ``prompt + output`` tokens of KV (output lengths are forced in the
paper's benchmarks), so nothing is preempted; the runtime admits on the prompt and
preempts by recompute when blocks run out, which only differs under memory pressure.
Requests that can never fit are marked failed (``inf``).
"""

from __future__ import annotations

from collections import deque
from enum import Enum

import numpy as np

from distserve_rt.planner.simulator.decode_lane import DecodeLane
from distserve_rt.planner.simulator.results import SimResult
from distserve_rt.planner.simulator.spec import SimInstanceSpec

_INF = float("inf")


class ColocatedPolicy(str, Enum):
    CONTINUOUS_BATCHING = "continuous_batching"
    CHUNKED_PREFILL = "chunked_prefill"


class ColocatedSimulator:
    """Simulate one colocated instance; arrays ``[num_requests]`` as in the disaggregated one."""

    def __init__(self, spec: SimInstanceSpec, policy: ColocatedPolicy) -> None:
        if spec.parallelism.pp_size != 1:
            raise NotImplementedError(
                f"colocated simulation supports pp=1 only, got {spec.parallelism}: the baselines "
                f"(vLLM, Sarathi) are compared at TP only, and a PP colocated schedule "
                f"(micro-batches mixing both phases) has no runtime counterpart yet"
            )
        self.spec = spec
        self.policy = ColocatedPolicy(policy)

    def run(self, arrival, prompt_lens, output_lens) -> SimResult:
        self._arrival = np.asarray(arrival, dtype=np.float64)
        self._out_arr = np.asarray(output_lens, dtype=np.int64)
        self._prompt = [int(x) for x in prompt_lens]
        self._out = self._out_arr.tolist()
        n = len(self._prompt)
        if not (self._arrival.size == n == len(self._out)):
            raise ValueError("arrival, prompt_lens and output_lens must have one length")
        self._ps, self._pe, self._ds, self._fin = ([_INF] * n for _ in range(4))
        self._lane = DecodeLane(self._affine())
        self._reserved = 0
        self._seats = 0
        if self.policy is ColocatedPolicy.CONTINUOUS_BATCHING:
            self._loop(self._prefill_first_step)
        else:
            self._loop(self._chunked_step)
        pe = np.asarray(self._pe)
        return SimResult(
            self._arrival,
            np.asarray(self._ps),
            pe,
            pe,
            pe,
            np.asarray(self._ds),
            np.asarray(self._fin),
            self._out_arr,
        )

    def _affine(self):
        cache: dict[int, tuple[float, float]] = {}
        lat = self.spec.latency

        def affine(batch: int) -> tuple[float, float]:
            got = cache.get(batch)
            if got is None:
                alpha, beta = lat.decode_affine(batch)
                got = cache[batch] = self.spec.step_overhead.decode_affine(batch, alpha, beta)
            return got

        return affine

    # ---- shared loop ---------------------------------------------------------------------

    def _loop(self, try_step) -> None:
        """Run until every request finished: ``try_step(t)`` runs a prefill-carrying step and
        returns its end time, or None when the step would be decode-only."""
        lane, arrival = self._lane, self._arrival
        n, i, t = len(self._prompt), 0, 0.0
        self._waiting: deque[int] = deque()
        self._prefilling: deque[list[int]] = deque()  # [req, prompt tokens done]
        while True:
            while i < n and arrival[i] <= t:
                self._enqueue(i)
                i += 1
            end = try_step(t)
            if end is not None:
                t = end
                continue
            next_arrival = float(arrival[i]) if i < n else _INF
            if lane.B > 0:
                steps = lane.heap[0][0] - lane.n
                if next_arrival < _INF:
                    steps = min(steps, lane.steps_until(next_arrival))
                lane.advance(max(steps, 1))
                t = lane.t0
                self._finish_decodes(t)
            elif i < n:
                t = lane.t0 = max(t, next_arrival)
            else:
                break

    def _enqueue(self, req: int) -> None:
        if self._prompt[req] + self._out[req] > self.spec.kv_capacity_tokens:
            return  # never fits: stays inf (failed)
        self._waiting.append(req)

    def _admit(self) -> int | None:
        """The head of the waiting queue if its KV and a seat are free (reserved), else None."""
        if not self._waiting:
            return None
        req = self._waiting[0]
        need = self._prompt[req] + self._out[req]
        if self._reserved + need > self.spec.kv_capacity_tokens:
            return None
        if self._seats >= self.spec.max_num_seqs:
            return None
        self._waiting.popleft()
        self._reserved += need
        self._seats += 1
        return req

    def _finish_decodes(self, now: float) -> None:
        for req in self._lane.pop_finished():
            self._fin[req] = now
            self._release(req)

    def _release(self, req: int) -> None:
        self._reserved -= self._prompt[req] + self._out[req]
        self._seats -= 1

    def _first_token(self, req: int, now: float) -> None:
        self._pe[req] = now
        if self._out[req] == 1:
            self._ds[req] = self._fin[req] = now
            self._release(req)
        else:
            self._ds[req] = now
            self._lane.add(req, self._prompt[req], self._out[req] - 1)

    # ---- policies ------------------------------------------------------------------------

    def _prefill_first_step(self, t: float) -> float | None:
        budget = self.spec.max_batch_tokens
        batch, num_tokens, sum_sq = [], 0, 0
        while self._waiting:
            length = self._prompt[self._waiting[0]]
            if batch and num_tokens + length > budget:
                break
            req = self._admit()
            if req is None:
                break
            batch.append(req)
            num_tokens += length
            sum_sq += length * length
        if not batch:
            return None
        end = t + self.spec.latency.prefill_s(num_tokens, sum_sq)
        end += self.spec.step_overhead.seconds(num_tokens)
        self._lane.t0 = end  # running decodes wait for the prefill step
        for req in batch:
            self._ps[req] = t
            self._first_token(req, end)
        return end

    def _chunked_step(self, t: float) -> float | None:
        lane = self._lane
        budget = self.spec.max_batch_tokens - lane.B
        chunks, num_tokens, sum_sq = [], 0, 0
        while budget > 0:
            if not self._prefilling:
                req = self._admit()
                if req is None:
                    break
                self._prefilling.append([req, 0])
                self._ps[req] = t
            entry = self._prefilling[0]
            req, done = entry
            size = min(budget, self._prompt[req] - done)
            chunks.append((entry, size))
            num_tokens += size
            sum_sq += size * (done + size)
            budget -= size
            if done + size == self._prompt[req]:
                self._prefilling.popleft()
        if not chunks:
            return None
        end = t + self.spec.latency.mixed_s(num_tokens, sum_sq, lane.B, lane.S)
        end += self.spec.step_overhead.seconds(num_tokens + lane.S - lane.B)
        # The decodes of this step advanced one token each.
        lane.S += lane.B
        lane.n += 1
        lane.t0 = end
        self._finish_decodes(end)
        for entry, size in chunks:
            entry[1] += size
            if entry[1] == self._prompt[entry[0]]:
                self._first_token(entry[0], end)
        return end

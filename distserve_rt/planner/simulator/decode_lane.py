"""One decode batch under continuous batching, advanced many steps at a time in closed form.

Between membership changes (a request joins or finishes) the batch size ``B`` is fixed and
a decode step costs ``alpha(B) + beta(B)·S`` where ``S`` = Σ(ctx+1) grows by ``B`` every
step, so ``d`` steps take ``T(d) = d·(alpha + beta·S) + beta·B·d(d−1)/2``. The lane jumps
straight to the next finish, or to the first step boundary after a new request is ready,
instead of simulating every step: the simulator's cost grows with requests, not tokens.

A PP = k decode instance runs k lanes (k micro-batches in flight, one per stage); with
evenly split layers each lane completes one step per whole-model step time of its own
micro-batch, plus the hops between stages (in ``alpha``). This assumes the micro-batches
are about equal in size, which the least-loaded lane choice keeps them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable


class DecodeLane:
    """State at a step boundary: time ``t0``, steps done ``n``, batch ``B``, Σ(ctx+1) ``S``."""

    __slots__ = ("affine", "t0", "n", "B", "S", "heap", "pending", "version", "_seq")

    def __init__(self, affine: Callable[[int], tuple[float, float]]) -> None:
        self.affine = affine
        """batch size -> (alpha, beta) seconds (hops included)."""
        self.t0 = 0.0
        self.n = 0
        self.B = 0
        self.S = 0
        self.heap: list[tuple[int, int, int, int]] = []  # (finish step, seq, req, prompt - join)
        self.pending: list[tuple[int, int, int]] = []  # (req, prompt_len, num_decode_steps)
        self.version = 0
        self._seq = 0

    def duration(self, d: int) -> float:
        """Seconds for the next ``d`` steps with the current members."""
        if d <= 0:
            return 0.0
        alpha, beta = self.affine(self.B)
        return d * (alpha + beta * self.S) + beta * self.B * d * (d - 1) / 2

    def steps_until(self, t: float) -> int:
        """Fewest steps ``d`` from ``t0`` whose end is at or after time ``t``."""
        delta = t - self.t0
        if delta <= 0 or self.B == 0:
            return 0
        alpha, beta = self.affine(self.B)
        qa = beta * self.B / 2
        qb = alpha + beta * self.S - qa
        if qa <= 1e-18:
            d = math.ceil(delta / qb)
        else:
            d = math.ceil((-qb + math.sqrt(qb * qb + 4 * qa * delta)) / (2 * qa))
        d = max(d, 1)
        while self.duration(d) < delta:
            d += 1
        while d > 1 and self.duration(d - 1) >= delta:
            d -= 1
        return d

    def advance(self, d: int) -> None:
        """Commit ``d`` steps with the current members."""
        if d > 0:
            self.t0 += self.duration(d)
            self.S += d * self.B
            self.n += d

    def add(self, req: int, prompt_len: int, num_decode_steps: int) -> None:
        """Join at the current boundary: its first step processes the prefill's token."""
        self.B += 1
        self.S += prompt_len + 1
        self._seq += 1
        heapq.heappush(self.heap, (self.n + num_decode_steps, self._seq, req, prompt_len - self.n))

    def pop_finished(self) -> list[int]:
        """Requests whose last step is the current boundary (removed from the batch)."""
        done = []
        while self.heap and self.heap[0][0] <= self.n:
            _, _, req, offset = heapq.heappop(self.heap)
            self.B -= 1
            self.S -= offset + self.n + 1
            done.append(req)
        return done

    def next_finish(self) -> tuple[float, int] | None:
        """(time, step) of the next finish with the current members, or None if empty."""
        if not self.heap:
            return None
        step = self.heap[0][0]
        return self.t0 + self.duration(step - self.n), step

"""Highest request rate meeting an SLO attainment target: bracket, then bisect.

Generic over "a function rate -> attainment", so the planner's simulator and `drt-run bench`
(which measures every rate it tries on a real engine) share one search. It assumes
attainment falls with rate; measured attainment is noisy, so a non-monotonic point only
moves the bracket, and the answer is always a rate that was tried and met the target.
"""

from __future__ import annotations

from collections.abc import Callable


def search_rate(
    attainment_at: Callable[[float], float],
    target: float,
    *,
    rate_hint: float = 1.0,
    rel_tol: float = 0.02,
    min_rate: float = 1e-3,
    max_rate: float = 1e5,
) -> tuple[float, dict[float, float]]:
    """Highest rate with ``attainment_at(rate) >= target`` (bracket + bisection).

    ``attainment_at`` is called at most once per rate (rates in req/s). Returns
    ``(rate, {rate: attainment})`` of every rate it tried; rate 0.0 when even ``min_rate``
    misses the target, ``max_rate``'s bracket end when nothing up to it misses.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    if not 0 < min_rate <= max_rate:
        raise ValueError(f"need 0 < min_rate <= max_rate, got {min_rate!r} and {max_rate!r}")
    seen: dict[float, float] = {}

    def ok(rate: float) -> bool:
        if rate not in seen:
            seen[rate] = attainment_at(rate)
        return seen[rate] >= target

    rate = min(max(rate_hint, min_rate), max_rate)
    if ok(rate):
        lo, hi = rate, rate * 2
        while hi <= max_rate and ok(hi):
            lo, hi = hi, hi * 2
        if hi > max_rate:
            return lo, seen
    else:
        hi, lo = rate, rate / 2
        while lo >= min_rate and not ok(lo):
            hi, lo = lo, lo / 2
        if lo < min_rate:
            return 0.0, seen
    while (hi - lo) > rel_tol * hi:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, seen

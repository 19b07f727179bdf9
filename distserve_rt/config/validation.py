"""The one rule every config field with a numeric range follows, and its error message.

``check_range("max_num_seqs", 0, low=1, integer=True)`` raises
``ValueError: max_num_seqs must be an int >= 1, got 0``. Bools are rejected (``True`` is an
int to Python, never a size to a user) and so is NaN (it fails every comparison).
"""

from __future__ import annotations

import math


def check_range(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    unit: str = "",
) -> None:
    """ValueError naming `name`, `value` and the allowed range unless `value` is a number
    (an int when `integer`) with ``low <= value <= high`` (strict at an open end; a missing
    bound is no limit). `unit` reads in the message: "a number of seconds > 0"."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok and not integer:
        ok = not math.isnan(value)
    if not ok:
        what = "an int" if integer else f"a number{f' of {unit}' if unit else ''}"
        raise ValueError(
            f"{name} must be {what} {_describe(low, high, low_open, high_open)}, got {value!r}"
        )


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "(any value)"

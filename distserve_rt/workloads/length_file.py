"""A user's request lengths, and optionally their arrival times, from a JSONL or CSV file.

JSONL: one object a line; CSV: a header line naming the columns. Column names are the ones
our own data files use (``prompt_tokens``/``output_tokens``, see `datasets`) or the shorter
``prompt_len``/``output_len``; an ``arrival_s`` (or ``timestamp``) column makes the file an
arrival trace as well. Every error names the file, the line and what is wrong, so a user
fixes a 10,000-line file without a debugger.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distserve_rt.workloads.workload import Workload

PROMPT_COLUMNS = ("prompt_len", "prompt_tokens")
OUTPUT_COLUMNS = ("output_len", "output_tokens")
ARRIVAL_COLUMNS = ("arrival_s", "timestamp")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class LengthFileError(ValueError):
    """A bad length file: the message is ``FILE:LINE: what is wrong``."""


@dataclass(frozen=True, eq=False)
class LengthFile:
    """The rows of a length file, in file order."""

    path: str
    prompt_lens: np.ndarray  # [num_rows] prompt tokens, >= 1
    output_lens: np.ndarray  # [num_rows] output tokens, >= 1
    arrival_s: np.ndarray | None
    """[num_rows] seconds after the first request (non-decreasing), or None without an
    arrival column. Shifted to start at 0: a trace's ``timestamp`` is often wall-clock."""

    @property
    def num_rows(self) -> int:
        return int(self.prompt_lens.size)

    def workload(self) -> Workload:
        """All rows as a workload (lengths only), to sample from like a built-in dataset."""
        return Workload(Path(self.path).name, self.prompt_lens, self.output_lens)

    def trace(self, num_requests: int | None = None) -> tuple[Workload, np.ndarray]:
        """The first ``num_requests`` rows (all if None) and their arrival times (s): a
        prefix of a trace is still the trace, a resample would scramble its arrivals."""
        if self.arrival_s is None:
            raise ValueError(
                f"{self.path} has no arrival column; replaying arrivals needs one of "
                f"{', '.join(ARRIVAL_COLUMNS)}"
            )
        num = self.num_rows if num_requests is None else num_requests
        if not 1 <= num <= self.num_rows:
            raise ValueError(
                f"--num-requests must be 1..{self.num_rows} (the rows of {self.path}) to "
                f"replay its arrivals, got {num}"
            )
        w = self.workload()
        return Workload(w.name, w.prompt_lens[:num], w.output_lens[:num]), self.arrival_s[:num]


def load_length_file(path: str | Path) -> LengthFile:
    """Parse ``path`` (.jsonl/.ndjson/.json: JSON lines; .csv: header and rows)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*_JSONL_SUFFIXES, ".csv"):
        raise LengthFileError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; "
            f"name it .jsonl ({', '.join(_JSONL_SUFFIXES)}) or .csv"
        )
    if not path.is_file():
        raise LengthFileError(f"{path}: no such file")
    with path.open(newline="") as f:
        records = _csv_records(path, f) if suffix == ".csv" else _jsonl_records(path, f)
        return _parse(path, records)


def _jsonl_records(path: Path, f) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LengthFileError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise LengthFileError(f"{path}:{line_no}: expected a JSON object, got {line.strip()}")
        yield line_no, record


def _csv_records(path: Path, f) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
        return  # no header: an empty file, reported by _parse
    header = [name.strip() for name in reader.fieldnames]
    for names, what in ((PROMPT_COLUMNS, "prompt length"), (OUTPUT_COLUMNS, "output length")):
        if not any(n in header for n in names):
            raise LengthFileError(
                f"{path}:1: the header has no {what} column; expected one of {', '.join(names)}"
            )
    reader.fieldnames = header
    for record in reader:
        if any(v for v in record.values() if isinstance(v, str) and v.strip()):
            yield reader.line_num, record


def _column(record: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in record), None)


def _parse(path: Path, records: Iterator[tuple[int, dict]]) -> LengthFile:
    prompts, outputs, arrivals = [], [], []
    arrival_col: str | None = None
    for line_no, record in records:
        where, first = f"{path}:{line_no}", not prompts
        prompts.append(_length(where, record, PROMPT_COLUMNS))
        outputs.append(_length(where, record, OUTPUT_COLUMNS))
        col = _column(record, ARRIVAL_COLUMNS)
        if first:
            arrival_col = col  # the first row decides whether this is a trace
        elif (col is None) != (arrival_col is None):
            has = "has" if col else "has no"
            raise LengthFileError(f"{where}: {has} an arrival time, unlike the first row")
        if arrival_col is not None:
            arrivals.append(_arrival(where, record, arrival_col, arrivals[-1:]))
    if not prompts:
        raise LengthFileError(f"{path}: no requests: the file has no rows")
    arrival_s = None
    if arrival_col is not None:
        arrival_s = np.asarray(arrivals, dtype=np.float64)
        arrival_s -= arrival_s[0]
    return LengthFile(
        str(path),
        np.asarray(prompts, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
        arrival_s,
    )


def _length(where: str, record: dict, names: tuple[str, ...]) -> int:
    col = _column(record, names)
    if col is None:
        raise LengthFileError(f"{where}: missing {' or '.join(names)}")
    value = record[col]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # not an int: the message below says so
            value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LengthFileError(f"{where}: {col} must be a whole number of tokens, got {value!r}")
    if value < 1:
        raise LengthFileError(f"{where}: {col} must be >= 1 token, got {value}")
    return value


def _arrival(where: str, record: dict, col: str, previous: list[float]) -> float:
    value = record[col]
    try:
        t = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        t = math.nan
    if isinstance(value, bool) or not math.isfinite(t):
        raise LengthFileError(f"{where}: {col} must be a finite number of seconds, got {value!r}")
    if previous and t < previous[0]:
        raise LengthFileError(
            f"{where}: {col} {t:g} is before the previous row's {previous[0]:g}; "
            "sort the trace by arrival"
        )
    return t

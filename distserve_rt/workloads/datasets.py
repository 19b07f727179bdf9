"""The paper's three length datasets, shipped as package data (see `distserve_rt/data/README.md`).

Each loader returns ``(prompt_lens, output_lens)``: int64 arrays ``[num_rows]`` of tokens.
"""

from __future__ import annotations

import csv
import json
from importlib import resources

import numpy as np

DATASETS = ("sharegpt", "humaneval", "longbench", "longbench-summarization")
"""Dataset names; ``longbench`` is all 8 tasks we have, ``longbench-summarization`` the
gov_report + multi_news rows the paper's summarisation workload stresses."""

DATASET_ALIASES = {
    "chat": "sharegpt",
    "chatbot": "sharegpt",
    "code": "humaneval",
    "summarization": "longbench-summarization",
}
"""The paper's application names -> the dataset it used for them."""

_SUMMARIZATION_TASKS = ("gov_report", "multi_news")


def data_path(filename: str):
    """A file of the package's ``data/`` folder (a Traversable; read it with read_text())."""
    return resources.files("distserve_rt").joinpath("data", filename)


def _jsonl(filename: str) -> list[dict]:
    text = data_path(filename).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _arrays(rows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return lens[:, 0].copy(), lens[:, 1].copy()


def resolve_dataset(name: str) -> str:
    """Canonical dataset name for ``name`` or an alias; ValueError listing the choices."""
    key = DATASET_ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {list(DATASETS)} "
            f"or an alias {sorted(DATASET_ALIASES)}"
        )
    return key


def load_lengths(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths (tokens, int64 ``[num_rows]``) of dataset ``name``."""
    key = resolve_dataset(name)
    if key == "sharegpt":
        with data_path("sharegpt_distserve_like.csv").open() as f:
            rows = [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in csv.DictReader(f)]
    elif key == "humaneval":
        rows = [(r["prompt_tokens"], r["output_tokens"]) for r in _jsonl("humaneval_lengths.jsonl")]
    else:
        records = _jsonl("longbench_distserve_like.jsonl")
        if key == "longbench-summarization":
            records = [r for r in records if r["task"] in _SUMMARIZATION_TASKS]
        rows = [(r["prompt_tokens"], r["output_tokens"]) for r in records]
    return _arrays(rows)

"""Requests from a ShareGPT-format JSON file, sampled as ``vllm bench serve --dataset-name
sharegpt --dataset-path FILE`` samples them.

The file is a JSON list of ``{"conversations": [{"from": "human", "value": ...}, {"from":
"gpt", "value": ...}, ...]}``. Entries with fewer than two turns are dropped; the rest are
shuffled with Python's ``random`` seeded by ``seed`` (vLLM's order, so the same seed picks
the same conversations given the same tokenizer). Of each, turn 0 is the prompt and turn
1's token count the output length (``output_len`` forces one). vLLM's filter applies: a
prompt or output under 4 tokens (the output check is skipped when ``output_len`` is
forced), a prompt over 1024 tokens, or prompt + output over 2048 tokens drops the entry.
Fewer valid entries than asked are topped up by drawing among them with replacement, as
vLLM oversamples.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from distserve_rt.workloads.workload import Workload

MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


def is_valid_sequence(prompt_len: int, output_len: int, *, check_output: bool = True) -> bool:
    """vLLM's ``is_valid_sequence`` with its default bounds."""
    return not (
        prompt_len < MIN_LEN
        or (check_output and output_len < MIN_LEN)
        or prompt_len > MAX_PROMPT_LEN
        or prompt_len + output_len > MAX_TOTAL_LEN
    )


def _conversations(path: Path) -> list[list[dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--dataset-path {str(path)!r}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--dataset-path {str(path)!r}: not a JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(
            f"--dataset-path {str(path)!r}: a ShareGPT file is a JSON list of objects with "
            f"'conversations', got a JSON {type(data).__name__}"
        )
    return [
        e["conversations"]
        for e in data
        if isinstance(e, dict)
        and isinstance(e.get("conversations"), list)
        and len(e["conversations"]) >= 2
    ]


def load_sharegpt(
    path: str | Path,
    encode: Callable[[str], list[int]],
    num_requests: int,
    *,
    seed: int = 0,
    output_len: int | None = None,
) -> tuple[Workload, list[list[int]]]:
    """``num_requests`` requests of the ShareGPT file at ``path``: their lengths and their
    prompt ids (``encode`` is the tokenizer's, special tokens included as vLLM counts)."""
    if num_requests < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_requests}")
    path = Path(path)
    conversations = _conversations(path)
    random.seed(seed)  # vLLM shuffles with the global generator; so do we, for its order
    random.shuffle(conversations)
    prompts: list[list[int]] = []
    outputs: list[int] = []
    for turns in conversations:
        if len(prompts) >= num_requests:
            break
        prompt, completion = (
            str(t.get("value", "")) if isinstance(t, dict) else "" for t in turns[:2]
        )
        ids = encode(prompt)
        out = len(encode(completion)) if output_len is None else output_len
        if is_valid_sequence(len(ids), out, check_output=output_len is None):
            prompts.append(ids)
            outputs.append(out)
    if not prompts:
        raise ValueError(
            f"--dataset-path {str(path)!r}: no conversation is usable (need >= 2 turns, a "
            f"prompt of {MIN_LEN}..{MAX_PROMPT_LEN} tokens and an output of >= {MIN_LEN}, "
            f"<= {MAX_TOTAL_LEN} tokens in all)"
        )
    if len(prompts) < num_requests:
        extra = random.choices(range(len(prompts)), k=num_requests - len(prompts))
        prompts += [prompts[i] for i in extra]
        outputs += [outputs[i] for i in extra]
    workload = Workload(path.name, [len(p) for p in prompts], outputs)
    return workload, prompts

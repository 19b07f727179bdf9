"""Multi-turn chat conversations: each turn's prompt is the whole conversation so far.

A conversation of 3-5 turns (configurable): turn ``k``'s prompt is turn ``k-1``'s prompt,
its answer and the user's new message. The answer is whatever the server generated (a
chat client sends back what it received), so conversations are replayed *closed loop*:
turn ``k+1`` arrives ``think_s[k]`` after turn ``k`` finished. `MultiTurnWorkload` holds
what does not depend on the server (start times, user messages as token ids, forced answer
lengths, think times); `next_prompt` builds a turn's prompt from what came back, the same
way in the runtime's benchmark and in the simulator, so that prefix-cache hits match.

Lengths come from the ShareGPT length rows the planner uses (`datasets.load_lengths`): a
row's prompt length is one user message and its output length that turn's answer, scaled
by ``scale`` (a CPU tiny model serves ~1/10 of a GPU model's tokens). The rows are
single-turn, so turns are independent draws: real conversations correlate their turns,
which this does not model. Token ids are uniform in ``[1, vocab_size)``, so two
conversations share no block unless they share ``system_prompt_len`` leading tokens (one
"system prompt" for all, as a deployed chat product has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_rt.workloads.datasets import load_lengths, resolve_dataset
from distserve_rt.workloads.workload import Workload

MULTI_TURN = "multi-turn"
"""The ``--dataset`` name of these conversations (simulate and plan)."""


@dataclass(frozen=True, eq=False)
class Turn:
    """One user message and the answer it asks for."""

    user_token_ids: np.ndarray  # [num_user_tokens] int64, the new message
    output_len: int
    """Answer tokens (forced: ``max_tokens`` with ``ignore_eos``, as the paper's benchmarks)."""
    think_s: float
    """Seconds from this turn's last token to the next turn's arrival (0 for the last)."""


@dataclass(frozen=True, eq=False)
class Conversation:
    conversation_id: int
    start_s: float
    """Arrival of the first turn (s)."""
    turns: tuple[Turn, ...]

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def max_context_len(self) -> int:
        """Prompt + answer tokens of the last turn (the longest request of the conversation)."""
        return sum(t.user_token_ids.size + t.output_len for t in self.turns)


def next_prompt(
    previous_prompt: Sequence[int], previous_output: Sequence[int], turn: Turn
) -> list[int]:
    """Turn ``k``'s prompt: turn ``k-1``'s prompt and answer, then the new user message (for
    the first turn, pass empty ``previous_*``)."""
    return [*previous_prompt, *previous_output, *turn.user_token_ids.tolist()]


@dataclass(frozen=True, eq=False)
class MultiTurnWorkload:
    """Conversations in order of their start time."""

    name: str
    conversations: tuple[Conversation, ...]

    @property
    def num_conversations(self) -> int:
        return len(self.conversations)

    @property
    def num_requests(self) -> int:
        """One request per turn."""
        return sum(c.num_turns for c in self.conversations)

    def max_seq_len(self) -> int:
        return max(c.max_context_len() for c in self.conversations)

    def flat_lengths(self) -> Workload:
        """Every turn as a single-turn request (prompt = the whole context so far, answers
        of their forced length), in conversation order: what a simulator without a prefix
        model and without closed-loop arrivals can take."""
        prompt, output = [], []
        for c in self.conversations:
            context = 0
            for t in c.turns:
                prompt.append(context + t.user_token_ids.size)
                output.append(t.output_len)
                context = prompt[-1] + t.output_len
        return Workload(self.name, np.asarray(prompt), np.asarray(output))

    def new_token_lengths(self) -> Workload:
        """`flat_lengths` with each prompt cut to what its turn adds (the previous answer
        and the new message; the whole first prompt): the prefill a perfect prefix cache
        leaves, so a throughput bound from it is one no cache can beat."""
        flat = self.flat_lengths()
        prompt = flat.prompt_lens.copy()
        i = 0
        for c in self.conversations:
            for k in range(1, c.num_turns):
                prompt[i + k] = flat.prompt_lens[i + k] - flat.prompt_lens[i + k - 1]
            i += c.num_turns
        return Workload(f"{self.name} new tokens", prompt, flat.output_lens)

    def describe(self) -> dict[str, float]:
        flat = self.flat_lengths()
        return {
            "num_conversations": self.num_conversations,
            "num_requests": self.num_requests,
            "prompt_mean": float(flat.prompt_lens.mean()),
            "output_mean": float(flat.output_lens.mean()),
            "max_seq_len": self.max_seq_len(),
        }

    @classmethod
    def generate(
        cls,
        num_conversations: int,
        *,
        rate: float,
        min_turns: int = 3,
        max_turns: int = 5,
        think_s: float = 1.0,
        dataset: str = "sharegpt",
        scale: float = 1.0,
        system_prompt_len: int = 0,
        max_seq_len: int | None = None,
        vocab_size: int = 32000,
        seed: int = 0,
    ) -> MultiTurnWorkload:
        """``num_conversations`` conversations starting as a Poisson process at ``rate``
        conversations/s, ``min_turns``..``max_turns`` turns each (uniform), exponential
        think times of mean ``think_s`` (0: the next turn arrives as the answer ends).

        ``max_seq_len``: a conversation whose last turn would exceed it is redrawn (its
        lengths, up to 100 times; then ValueError asking for a smaller ``scale``). That
        keeps the conversations that fit the context, so it shortens the mean lengths: a
        chat that outgrows its context ends there, rather than being truncated (dropping
        early turns would break the prefix every later turn shares)."""
        _check_int("num_conversations", num_conversations, 1)
        _check_int("min_turns", min_turns, 1)
        _check_int("max_turns", max_turns, min_turns)
        _check_int("system_prompt_len", system_prompt_len, 0)
        _check_int("vocab_size", vocab_size, 2)
        for key, value, low in (("rate", rate, 0.0), ("scale", scale, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"{key} must be a number > 0, got {value!r}")
        if isinstance(think_s, bool) or not isinstance(think_s, (int, float)) or think_s < 0:
            raise ValueError(f"think_s must be a number >= 0, got {think_s!r}")
        if max_seq_len is not None:
            _check_int("max_seq_len", max_seq_len, 2)
        key = resolve_dataset(dataset)
        user_lens, answer_lens = load_lengths(key)
        rng = np.random.default_rng(seed)
        system = rng.integers(1, vocab_size, system_prompt_len, dtype=np.int64)
        starts = np.cumsum(rng.exponential(1.0 / rate, num_conversations))
        conversations = []
        for cid in range(num_conversations):
            num_turns = int(rng.integers(min_turns, max_turns + 1))
            lens = _draw_lengths(
                rng, user_lens, answer_lens, num_turns, scale, system_prompt_len, max_seq_len
            )
            turns = []
            for k, (num_user, num_out) in enumerate(lens):
                ids = rng.integers(1, vocab_size, num_user, dtype=np.int64)
                if k == 0:
                    ids = np.concatenate([system, ids])
                last = k == num_turns - 1
                think = 0.0 if last or think_s == 0 else float(rng.exponential(think_s))
                turns.append(Turn(ids, num_out, think))
            conversations.append(Conversation(cid, float(starts[cid]), tuple(turns)))
        name = f"multi-turn({key}x{scale:g},{min_turns}-{max_turns} turns)"
        return cls(name, tuple(conversations))


def _draw_lengths(rng, user_lens, answer_lens, num_turns, scale, system_len, max_seq_len):
    for _ in range(100):
        rows = rng.integers(0, user_lens.size, num_turns)
        users = np.maximum(1, np.rint(user_lens[rows] * scale)).astype(np.int64)
        answers = np.maximum(1, np.rint(answer_lens[rows] * scale)).astype(np.int64)
        if max_seq_len is None or system_len + int(users.sum() + answers.sum()) <= max_seq_len:
            return list(zip(users.tolist(), answers.tolist(), strict=True))
    raise ValueError(
        f"max_seq_len={max_seq_len} is too short for {num_turns}-turn conversations at "
        f"scale={scale:g} (100 draws all longer); lower the scale (--length-scale) or the "
        f"turns (--turns)"
    )


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an int >= {low}, got {value!r}")

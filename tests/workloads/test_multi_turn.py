"""The multi-turn workload generator: seeded, 3-5 turns, prompts that grow by the previous
turn's prompt and answer, think times, a shared system prompt, bad arguments refused."""

from __future__ import annotations

import numpy as np
import pytest

from distserve_rt.workloads.multi_turn import MultiTurnWorkload, next_prompt


def make(**kw) -> MultiTurnWorkload:
    args = dict(rate=2.0, scale=0.05, think_s=1.5, seed=3)
    args.update(kw)
    return MultiTurnWorkload.generate(20, **args)


def test_seeded_and_shaped():
    a, b, c = make(), make(), make(seed=4)
    ids = [t.user_token_ids.tolist() for conv in a.conversations for t in conv.turns]
    assert ids == [t.user_token_ids.tolist() for conv in b.conversations for t in conv.turns]
    assert ids != [t.user_token_ids.tolist() for conv in c.conversations for t in conv.turns]
    assert {conv.num_turns for conv in a.conversations} <= {3, 4, 5}
    assert len({conv.num_turns for conv in a.conversations}) > 1
    starts = [conv.start_s for conv in a.conversations]
    assert starts == sorted(starts) and starts[0] > 0
    for conv in a.conversations:
        assert conv.turns[-1].think_s == 0.0
        assert all(t.think_s > 0 for t in conv.turns[:-1])
    assert a.num_requests == sum(conv.num_turns for conv in a.conversations)


def test_prompts_contain_the_previous_turns():
    conv = make().conversations[0]
    prompt, answer = [], []
    for turn in conv.turns:
        new = next_prompt(prompt, answer, turn)
        assert new[: len(prompt) + len(answer)] == prompt + answer
        assert new[len(prompt) + len(answer) :] == turn.user_token_ids.tolist()
        prompt, answer = new, [7] * turn.output_len
    flat = make().flat_lengths()
    k = conv.num_turns
    assert flat.prompt_lens[k - 1] == len(prompt)
    assert flat.prompt_lens[k - 1] + flat.output_lens[k - 1] == conv.max_context_len()


def test_system_prompt_is_shared_and_max_seq_len_holds():
    w = make(system_prompt_len=24, max_seq_len=200)
    firsts = [conv.turns[0].user_token_ids[:24].tolist() for conv in w.conversations]
    assert all(f == firsts[0] for f in firsts)
    assert w.max_seq_len() <= 200
    assert make(think_s=0).conversations[0].turns[0].think_s == 0.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(rate=0), "rate must be a number > 0, got 0"),
        (dict(min_turns=4, max_turns=3), "max_turns must be an int >= 4, got 3"),
        (dict(think_s=-1), "think_s must be a number >= 0, got -1"),
        (dict(dataset="nope"), "unknown dataset 'nope'"),
        (dict(scale=1.0, max_seq_len=300), "max_seq_len=300 is too short"),
    ],
)
def test_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        make(**kw)


def test_vocab_range():
    w = make(vocab_size=10)
    ids = np.concatenate([t.user_token_ids for c in w.conversations for t in c.turns])
    assert ids.min() >= 1 and ids.max() < 10

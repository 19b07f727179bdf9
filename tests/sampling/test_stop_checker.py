"""Stop conditions, the cut at stop strings, and the streamed text's hold-back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distserve_rt.core.detokenizer import IncrementalDetokenizer
from distserve_rt.core.stop_checker import FinishReason, StopChecker
from distserve_rt.sampling_params import SamplingParams
from tests.sampling.fake_tokenizer import EOS, ByteTokenizer, byte_ids, merge_ids

PROMPT = ByteTokenizer().encode("prompt: ")


def _checker(max_model_len=1000, detokenize=True, **params):
    params.setdefault("max_tokens", 100)
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, PROMPT) if detokenize else None
    return StopChecker(
        SamplingParams(**params),
        eos_token_id=EOS,
        num_prompt_tokens=len(PROMPT),
        max_model_len=max_model_len,
        detokenizer=detok,
    )


def _run(checker, ids):
    """Feeds ids until the request finishes; returns (deltas, last result, tokens used)."""
    deltas, result = [], None
    for used, token_id in enumerate(ids, start=1):
        result = checker.append(token_id)
        deltas.append(result.text_delta)
        if result.finish_reason is not None:
            return deltas, result, used
    return deltas, result, len(ids)


def test_eos_stops_and_is_not_text():
    checker = _checker(skip_special_tokens=False)
    deltas, result, used = _run(checker, [*byte_ids(b"hi"), EOS, *byte_ids(b"x")])
    assert (result.finish_reason, result.stop_reason, used) == (FinishReason.STOP, None, 3)
    assert "".join(deltas) == checker.output_text == "hi"


def test_ignore_eos_keeps_going_until_max_tokens():
    checker = _checker(ignore_eos=True, max_tokens=4)
    deltas, result, used = _run(checker, [*byte_ids(b"a"), EOS, *byte_ids(b"bcd")])
    assert (result.finish_reason, used) == (FinishReason.LENGTH, 4)
    assert "".join(deltas) == "abc"


def test_stop_token_id_is_the_stop_reason():
    stop_id = byte_ids(b"!")[0]
    checker = _checker(stop_token_ids=[stop_id])
    deltas, result, _ = _run(checker, byte_ids(b"yes!no"))
    assert (result.finish_reason, result.stop_reason) == (FinishReason.STOP, stop_id)
    assert "".join(deltas) == "yes"


def test_stop_token_text_kept_with_include_stop_str_in_output():
    stop_id = byte_ids(b"!")[0]
    checker = _checker(stop_token_ids=[stop_id], include_stop_str_in_output=True)
    deltas, _, _ = _run(checker, byte_ids(b"yes!no"))
    assert "".join(deltas) == "yes!"


def test_min_tokens_defers_every_stop():
    stop_id = byte_ids(b"!")[0]
    checker = _checker(min_tokens=4, stop=["a"], stop_token_ids=[stop_id])
    deltas, result, used = _run(checker, [EOS, stop_id, *byte_ids(b"a"), EOS, *byte_ids(b"z")])
    assert (result.finish_reason, used) == (FinishReason.STOP, 4)
    assert "".join(deltas) == "!a"


def test_max_model_len_stops_with_length():
    checker = _checker(max_model_len=len(PROMPT) + 3, max_tokens=None)
    _, result, used = _run(checker, byte_ids(b"abcdef"))
    assert (result.finish_reason, used) == (FinishReason.LENGTH, 3)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    checker = _checker(stop=["STOP"])
    ids = byte_ids(b"go ST") + byte_ids(b"O") + byte_ids(b"P more")
    deltas, result, used = _run(checker, ids)
    assert (result.finish_reason, result.stop_reason) == (FinishReason.STOP, "STOP")
    assert used == 7 and checker.output_text == "go "
    assert deltas == ["g", "o", " ", "", "", "", ""]


def test_stop_string_included_when_asked():
    checker = _checker(stop=["STOP"], include_stop_str_in_output=True)
    deltas, result, _ = _run(checker, byte_ids(b"go STOP more"))
    assert result.finish_reason == FinishReason.STOP
    assert "".join(deltas) == checker.output_text == "go STOP"


def test_false_start_of_a_stop_string_is_released():
    checker = _checker(stop=["STOP"])
    deltas, result, _ = _run(checker, byte_ids(b"STOx"))
    assert result.finish_reason is None
    assert deltas == ["", "", "", "STOx"]


def test_earliest_stop_string_wins():
    # One merge token completes both stop strings at once; the earlier occurrence cuts.
    stop_merge = merge_ids()[1]  # b"STOP"
    checker = _checker(stop=["OP", "TOP"])
    _, result, _ = _run(checker, [*byte_ids(b"x"), stop_merge])
    assert (checker.output_text, result.stop_reason) == ("xS", "TOP")


def test_stop_needs_a_detokenizer():
    with pytest.raises(ValueError, match="detokenizer"):
        _checker(stop=["x"], detokenize=False)


def test_token_ids_only():
    checker = _checker(detokenize=False, max_tokens=2)
    deltas, result, used = _run(checker, byte_ids(b"abc"))
    assert (deltas, result.finish_reason, used) == (["", ""], FinishReason.LENGTH, 2)


def test_append_after_finish_raises():
    checker = _checker(max_tokens=1)
    checker.append(byte_ids(b"a")[0])
    with pytest.raises(RuntimeError, match="finished"):
        checker.append(byte_ids(b"b")[0])


def _reference_text(text_steps: list[str], stops: list[str], include: bool) -> str:
    """Text accumulated token by token, cut at the first token that completes a stop."""
    text = ""
    for piece in text_steps:
        text += piece
        found = [(text.find(s), -len(s), s) for s in stops if s in text]
        if found:
            start, _, stop = min(found)
            return text[: start + len(stop)] if include else text[:start]
    return text


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from(list(b"abcAB\xc3\xa9 ")), min_size=1, max_size=40),
    stops=st.lists(st.text(alphabet="abcAB é", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
)
def test_streamed_deltas_concatenate_to_the_final_text(data, stops, include):
    ids = byte_ids(bytes(data))
    # max_tokens = all the ids: the request always finishes, by a stop string or LENGTH.
    checker = _checker(stop=stops, include_stop_str_in_output=include, max_tokens=len(ids))
    deltas, result, used = _run(checker, ids)
    assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert "".join(deltas) == checker.output_text
    # The text each token adds: decode of the growing output without a trailing
    # incomplete character, except at the end where LENGTH flushes everything.
    tok = ByteTokenizer()
    steps, previous = [], ""
    for n in range(1, used + 1):
        full = tok.decode(ids[:n])
        if n < used or result.finish_reason != FinishReason.LENGTH:
            full = full.rstrip("\ufffd")
        steps.append(full[len(previous) :])
        previous = full
    assert checker.output_text == _reference_text(steps, stops, include)

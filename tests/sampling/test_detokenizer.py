"""Incremental detokenization on a byte-level tokenizer whose tokens split UTF-8 characters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from distserve_rt.core.detokenizer import IncrementalDetokenizer
from tests.sampling.fake_tokenizer import EOS, ByteTokenizer, byte_ids, merge_ids


def _stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detok.add_token(t) for t in output_ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.output_text
    return deltas


def test_multibyte_character_is_held_until_complete():
    tok = ByteTokenizer()
    euro = "€".encode()  # 3 bytes, fed one token per byte
    deltas = _stream(tok, tok.encode("hi"), byte_ids(b"a" + euro + b"b"))
    assert deltas == ["a", "", "", "€", "b", ""]


def test_merge_tokens_that_split_characters():
    tok = ByteTokenizer()
    e_acute, euro_head, euro_tail_x = merge_ids()[3:6]
    ids = [euro_head, euro_tail_x, *byte_ids(b" "), e_acute, EOS, *byte_ids(b"z")]
    deltas = _stream(tok, tok.encode("p"), ids)
    assert "".join(deltas) == tok.decode(ids) == "€x éz"
    assert deltas[0] == ""  # the first two bytes of the euro sign alone are not text yet


def test_special_tokens_kept_when_asked():
    tok = ByteTokenizer()
    ids = [*byte_ids(b"a"), EOS, *byte_ids(b"b")]
    deltas = _stream(tok, [], ids, skip_special_tokens=False)
    assert "".join(deltas) == "a</s>b"


def test_incomplete_tail_is_flushed_as_decode_shows_it():
    tok = ByteTokenizer()
    ids = byte_ids(b"ok" + "€".encode()[:2])
    deltas = _stream(tok, [], ids)
    assert deltas[-1] == "\ufffd" and "".join(deltas) == tok.decode(ids)


def test_cost_per_token_does_not_grow_with_length():
    tok = ByteTokenizer()
    _stream(tok, tok.encode("a long prompt " * 50), byte_ids(b"x" * 2000))
    assert max(tok.decode_lengths) <= 8


_token_ids = st.one_of(
    st.integers(min_value=2, max_value=257),  # single bytes, any value (invalid UTF-8 too)
    st.sampled_from(merge_ids()),
    st.just(EOS),
)


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.lists(_token_ids, max_size=8),
    output=st.lists(_token_ids, max_size=40),
    skip=st.booleans(),
)
def test_deltas_concatenate_to_decode_of_all_ids(prompt, output, skip):
    tok = ByteTokenizer()
    deltas = _stream(tok, prompt, output, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=30))
def test_text_split_anywhere_in_bytes_round_trips(text):
    tok = ByteTokenizer()
    data = text.encode()
    deltas = _stream(tok, tok.encode("ctx"), byte_ids(data))
    assert "".join(deltas) == text
    # Nothing ever streams a replacement char for text that is valid UTF-8.
    assert all("\ufffd" not in d for d in deltas)

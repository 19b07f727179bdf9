"""The OpenAI logprob shapes from the engine's `Logprob` rows: values from ``.logprob``, top
tokens by value, token text from ``decoded_token`` when the engine filled it."""

from __future__ import annotations

from distserve_rt.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from distserve_rt.logprobs import Logprob


class NoDecode:
    """Any decode call fails: the texts must come from decoded_token."""

    def decode(self, ids, skip_special_tokens=True):
        raise AssertionError(f"decoded {ids} although decoded_token was set")


ROWS = [{7: Logprob(-0.5, 2, "b"), 4: Logprob(-0.2, 1, "a"), 9: Logprob(-3.0, 3, "c")}]


def test_completion_shape_from_logprob_objects():
    out = completion_logprobs(NoDecode(), [7], ROWS, num_top=2, text_offset=10)
    assert out.tokens == ["b"] and out.token_logprobs == [-0.5]
    assert out.top_logprobs == [{"a": -0.2, "b": -0.5}] and out.text_offset == [10]


def test_chat_shape_from_logprob_objects():
    (entry,) = chat_logprobs(NoDecode(), [7], ROWS, num_top=3).content
    assert (entry.token, entry.logprob, entry.bytes) == ("b", -0.5, [98])
    assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
        ("a", -0.2), ("b", -0.5), ("c", -3.0),
    ]  # fmt: skip

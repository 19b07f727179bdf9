"""The token-only fast path of `StopChecker.append` decides exactly like the full path."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from distserve_rt.core.stop_checker import StopChecker
from distserve_rt.sampling_params import SamplingParams


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    max_tokens=st.one_of(st.none(), st.integers(1, 30)),
    min_tokens=st.integers(0, 5),
    stop_ids=st.lists(st.integers(0, 6), max_size=2),
    ignore_eos=st.booleans(),
    num_prompt=st.integers(1, 20),
)
def test_fast_path_matches_full_path(
    tokens, max_tokens, min_tokens, stop_ids, ignore_eos, num_prompt
):
    if max_tokens is not None:
        min_tokens = min(min_tokens, max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop_token_ids=stop_ids,
        ignore_eos=ignore_eos,
    )
    kwargs = dict(eos_token_id=2, num_prompt_tokens=num_prompt, max_model_len=32, detokenizer=None)
    fast, full = StopChecker(params, **kwargs), StopChecker(params, **kwargs)
    full._fast_path = False
    for t in tokens:
        a, b = fast.append(t), full.append(t)
        assert (a.finish_reason, a.stop_reason, a.text_delta) == (
            b.finish_reason,
            b.stop_reason,
            b.text_delta,
        )
        assert fast.num_output_tokens == full.num_output_tokens
        if a.finish_reason is not None:
            break

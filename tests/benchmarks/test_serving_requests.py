"""Benchmark requests: arrival process, length clipping, prompt token ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distserve_rt.benchmarks.serving.request_set import (
    arrival_offsets,
    build_requests,
    clip_lengths,
    text_token_ids,
    tokenizer_special_ids,
)
from distserve_rt.tokenizer import get_tokenizer
from distserve_rt.workloads import LengthDist, Workload


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_mean_rate_within_tolerance(burstiness):
    times = arrival_offsets(4000, 8.0, burstiness=burstiness, seed=3)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    measured = (times.size - 1) / times[-1]
    assert measured == pytest.approx(8.0, rel=0.08)
    # Burstiness is the gamma shape: the gaps' CV is 1/sqrt(burstiness).
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(burstiness**-0.5, rel=0.1)


def test_arrivals_scale_with_rate_and_inf_sends_all_at_once():
    slow, fast = arrival_offsets(50, 1.0, seed=1), arrival_offsets(50, 4.0, seed=1)
    np.testing.assert_allclose(slow, 4 * fast)  # same unit gaps: common random numbers
    assert not np.array_equal(arrival_offsets(50, 1.0, seed=2), slow)
    np.testing.assert_array_equal(arrival_offsets(5, math.inf), np.zeros(5))
    with pytest.raises(ValueError, match="rate must be > 0"):
        arrival_offsets(5, 0.0)
    with pytest.raises(ValueError, match="burstiness must be > 0"):
        arrival_offsets(5, 1.0, burstiness=0.0)


def test_clip_lengths_keeps_outputs_and_cuts_prompts():
    prompt, output, num = clip_lengths(np.array([10, 90, 50, 5]), np.array([5, 20, 200, 95]), 100)
    assert prompt.tolist() == [10, 80, 1, 5]
    assert output.tolist() == [5, 20, 99, 95]
    assert num == 2
    assert np.all(prompt + output <= 100) and np.all(prompt >= 1)
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        clip_lengths(np.array([1]), np.array([1]), 1)


def test_prompt_ids_avoid_special_ids_and_are_seeded():
    tok = get_tokenizer("dummy:llama-tiny")
    specials = tokenizer_special_ids(tok)
    assert specials == [0, 1, 2]
    workload = Workload("w", np.array([300, 40, 7]), np.array([4, 900, 3]))
    rs = build_requests(
        workload, rate=2.0, vocab_size=tok.vocab_size, special_ids=specials, max_model_len=512
    )
    assert rs.num_clipped == 1
    assert [r.prompt_len for r in rs.requests] == [300, 1, 7]
    assert [r.output_len for r in rs.requests] == [4, 511, 3]
    ids = np.concatenate([r.prompt_token_ids for r in rs.requests])
    assert ids.min() >= 3 and ids.max() < tok.vocab_size
    again = build_requests(
        workload, rate=9.0, vocab_size=tok.vocab_size, special_ids=specials, max_model_len=512
    )
    # Same requests at another rate; only arrivals differ.
    assert [r.prompt_token_ids for r in again.requests] == [r.prompt_token_ids for r in rs.requests]
    assert again.requests[1].arrival_s == pytest.approx(rs.requests[1].arrival_s * 2 / 9)


def test_text_token_ids_rejects_an_all_special_vocab():
    assert text_token_ids(5, [0, 4]).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="every id"):
        text_token_ids(2, [0, 1])


def test_synthetic_workload_feeds_requests():
    w = Workload.synthetic(6, LengthDist("fixed", 12), LengthDist("uniform", low=2, high=5))
    rs = build_requests(w, rate=math.inf, vocab_size=100, special_ids=[0], max_model_len=64)
    assert all(r.prompt_len == 12 and 2 <= r.output_len <= 5 for r in rs.requests)
    assert all(r.arrival_s == 0.0 for r in rs.requests)

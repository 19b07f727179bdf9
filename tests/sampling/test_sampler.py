"""Sampler: greedy and truncation equivalences, distributions against a reference,
per-request seeds, min_tokens suppression, raw logprobs."""

from __future__ import annotations

import pytest
import torch

from distserve_rt.layers import truncation
from distserve_rt.layers.sampler import Sampler, inverse_cdf_sample
from distserve_rt.layers.sampling_metadata import SamplingMetadata, make_generator
from distserve_rt.sampling_params import SamplingParams
from tests.sampling.sampler_reference import reference_probs

VOCAB = 64
EOS = 3


def _build(params, num_generated=None, generators=None, vocab=VOCAB, device="cpu", **kwargs):
    num_generated = num_generated or [0] * len(params)
    if generators is None:
        generators = [
            make_generator(p.seed, device) if p.seed is not None else None for p in params
        ]
    return SamplingMetadata.build(
        params,
        num_generated,
        generators,
        eos_token_id=EOS,
        vocab_size=vocab,
        device=device,
        **kwargs,
    )


def _sample(logits, params, **kwargs):
    return Sampler()(logits.clone(), _build(params, device=logits.device, **kwargs))


def _logits(num_rows, vocab=VOCAB, seed=0, scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_rows, vocab, generator=gen) * scale).to(device)


def test_greedy_is_argmax(device):
    logits = _logits(16, device=device)
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 16)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=0.9, top_p=1e-6),
        SamplingParams(temperature=2.0, min_p=1.0),
        SamplingParams(temperature=0.5, top_k=5, top_p=1e-6, seed=3),
    ],
    ids=["top_k=1", "tiny_top_p", "min_p=1", "seeded"],
)
def test_truncation_to_one_token_is_greedy(device, params):
    logits = _logits(32, seed=1, device=device)
    for _ in range(3):
        out = _sample(logits, [params] * 32)
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.8, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.15),
        SamplingParams(temperature=1.5, top_k=5, top_p=0.8, min_p=0.05),
    ],
    ids=["t1", "t0.6", "top_k", "top_p", "min_p", "all"],
)
def test_empirical_distribution_matches_reference(params):
    vocab, num_draws = 10, 20000
    row = _logits(1, vocab=vocab, seed=7, scale=1.0)
    # One step of num_draws identical rows: the draws are independent given one batch seed.
    batch_generator = torch.Generator().manual_seed(11)
    out = _sample(
        row.expand(num_draws, vocab),
        [params] * num_draws,
        vocab=vocab,
        batch_generator=batch_generator,
    )
    counts = torch.bincount(out.token_ids, minlength=vocab).double()
    probs = reference_probs(row[0], params)
    assert torch.all(counts[probs == 0] == 0), (counts, probs)
    assert _chi_square_p_value(counts, probs) > 1e-4, (counts / num_draws, probs)


def test_seeded_rows_do_not_depend_on_the_batch():
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    other = SamplingParams(temperature=0.7, top_k=8)
    row_logits = _logits(1, seed=5, scale=1.0)

    def run(num_before: int, num_after: int, batch_seed: int) -> list[int]:
        generator = make_generator(42, "cpu")  # one per request, kept across steps
        batch_generator = torch.Generator().manual_seed(batch_seed)
        tokens = []
        for step in range(6):
            rows = num_before + 1 + num_after
            logits = _logits(rows, seed=100 + step + batch_seed)
            logits[num_before] = row_logits[0]
            params = [other] * num_before + [seeded] + [other] * num_after
            gens = [None] * num_before + [generator] + [None] * num_after
            out = _sample(logits, params, generators=gens, batch_generator=batch_generator)
            tokens.append(int(out.token_ids[num_before]))
        return tokens

    alone = run(0, 0, 0)
    assert run(3, 1, 1) == alone
    assert run(0, 5, 2) == alone
    assert run(7, 0, 3) == alone
    assert len(set(alone)) > 1  # the row really samples
    assert run(0, 0, 0) == alone


def test_seed_changes_the_tokens():
    row = _logits(1, seed=5, scale=0.5).expand(1, VOCAB)

    def tokens(seed):
        gen = make_generator(seed, "cpu")
        params = [SamplingParams(temperature=1.0, seed=seed)]
        return [int(_sample(row, params, generators=[gen]).token_ids[0]) for _ in range(8)]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_eos_and_stop_ids(temperature):
    stop_id = 9
    logits = _logits(4, scale=0.1)
    logits[:, EOS] = 50.0
    logits[:, stop_id] = 49.0
    params = SamplingParams(
        temperature=temperature, min_tokens=3, stop_token_ids=[stop_id], ignore_eos=True
    )
    out = _sample(logits, [params] * 4, num_generated=[0, 2, 3, 10])
    short, done = out.token_ids[:2], out.token_ids[2:]
    assert not torch.isin(short, torch.tensor([EOS, stop_id])).any()
    assert torch.isin(done, torch.tensor([EOS, stop_id])).all()
    if temperature == 0.0:
        masked = logits[:2].clone()
        masked[:, [EOS, stop_id]] = -torch.inf
        assert torch.equal(short, masked.argmax(dim=-1))
        assert done.tolist() == [EOS, EOS]


def test_min_tokens_suppression_leaves_other_rows_alone():
    logits = _logits(2, scale=0.1)
    logits[:, EOS] = 50.0
    params = [SamplingParams(temperature=0.0, min_tokens=2), SamplingParams(temperature=0.0)]
    out = _sample(logits, params, num_generated=[0, 0])
    assert out.token_ids[0] != EOS and out.token_ids[1] == EOS


def test_logprobs_are_raw_log_softmax():
    logits = _logits(6, seed=2)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=4, logprobs=0),
        SamplingParams(temperature=1.5, top_p=0.5, min_tokens=2),
    ] * 2
    out = _sample(logits, params, num_generated=[0] * 6)
    raw = torch.log_softmax(logits, dim=-1)
    lp = out.logprobs
    assert lp is not None
    assert torch.allclose(lp.sampled_logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    top = raw.topk(3, dim=-1)
    assert torch.equal(lp.topk_token_ids, top.indices)
    assert torch.allclose(lp.topk_logprobs, top.values)
    expected_ranks = (raw > lp.sampled_logprobs[:, None]).sum(-1) + 1
    assert torch.equal(lp.sampled_ranks, expected_ranks)
    assert lp.sampled_ranks[0] == 1  # the greedy row took the most likely token


def test_mixed_greedy_and_sampled_rows():
    logits = _logits(8, seed=4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2)] * 4
    out = _sample(logits, params)
    greedy = out.token_ids[0::2]
    assert torch.equal(greedy, logits[0::2].argmax(dim=-1))
    top2 = logits[1::2].topk(2, dim=-1).indices
    assert (top2 == out.token_ids[1::2, None]).any(dim=-1).all()


def test_top_p_candidate_path_matches_full_sort(monkeypatch):
    # Peaked rows find their nucleus among the candidates, flat rows fall back to a sort.
    logits = torch.cat([_logits(4, seed=8, scale=6.0), _logits(4, seed=9, scale=0.1)])
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([0.3, 0.9, 0.5, 1.0, 0.9, 0.5, 0.99, 0.2])
    expected = torch.stack(
        [
            reference_probs(logits[i], SamplingParams(temperature=1.0, top_p=float(top_p[i])))
            for i in range(8)
        ]
    )
    monkeypatch.setattr(truncation, "TOP_P_CANDIDATES", (2, 8))
    got = probs.clone()
    truncation.mask_top_p(got, top_p)
    assert torch.equal(got > 0, expected > 0)


def test_inverse_cdf_never_picks_a_masked_token():
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    uniform = torch.tensor([0.0, 0.5, 1.0 - 2**-24, 0.999999])
    assert inverse_cdf_sample(probs, uniform).tolist() == [2, 4, 4, 4]


def test_metadata_rejects_bad_batches():
    seeded = SamplingParams(temperature=1.0, seed=1)
    with pytest.raises(ValueError, match="make_generator"):
        _build([seeded], generators=[None])
    with pytest.raises(ValueError, match="one entry per row"):
        _build([seeded, seeded], num_generated=[0], generators=[None, None])
    with pytest.raises(ValueError, match="stop_token_ids"):
        _build([SamplingParams(stop_token_ids=[VOCAB])])
    with pytest.raises(ValueError, match="logprobs"):
        _build([SamplingParams(logprobs=VOCAB + 1)])
    with pytest.raises(ValueError, match="seed"):
        make_generator(-1, "cpu")


def test_sampler_rejects_bad_logits():
    meta = _build([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, VOCAB + 1), meta)
    with pytest.raises(ValueError, match="float32"):
        Sampler()(torch.zeros(2, VOCAB, dtype=torch.float16), meta)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", -1),
        ("seed", 2**64),  # torch.Generator's limit: it used to fail the whole engine step
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("logprobs", -1),
        ("ignore_eos", 1),
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", None),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_largest_64_bit_seed_is_accepted_and_seeds_a_generator():
    params = SamplingParams(seed=2**64 - 1)
    assert make_generator(params.seed, "cpu").initial_seed() == 2**64 - 1


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)

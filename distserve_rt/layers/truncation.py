"""min-p, top-k and top-p truncation of a batch's distributions, each row its own value.

All three keep or drop tokens by *value* against a per-row threshold, so tokens tied at
the threshold are all kept (a positional cut would keep an arbitrary subset of the tie).
min-p and top-k commute (renormalising does not change which tokens they keep); top-p is
applied last, to what they left, as in vLLM.
"""

from __future__ import annotations

import torch

# On CPU, top-p looks for each row's nucleus among the 256 most likely tokens (a cheap
# `topk`), then among 2048 for the rows whose nucleus is larger, and only then sorts the
# whole row. A full sort of 256 x 32000 costs ~300 ms on two CPU cores, topk(256) ~20 ms.
TOP_P_CANDIDATES = (256, 2048)


def mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Sets to -inf, in place, tokens with ``p_i < min_p * p_max``, i.e. in logit space
    ``l_i < l_max + log(min_p)`` (no softmax needed; min_p = 0 gives -inf: keeps all).
    ``logits [num_rows, vocab]``, ``min_p`` float32 ``[num_rows]``."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    logits.masked_fill_(logits < threshold, -torch.inf)


def mask_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Sets to -inf, in place, tokens less likely than the row's k-th most likely one.
    ``top_k`` int64 ``[num_rows]`` in ``[1, vocab]`` (vocab = keep all); ``max_top_k``:
    its largest value below vocab (host int, so no device sync here)."""
    # topk of the largest k asked for is much cheaper than a full sort of the vocabulary.
    top_values = logits.topk(max_top_k, dim=-1).values  # descending
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    keeps_all = (top_k >= logits.shape[1]).unsqueeze(1)
    kth.masked_fill_(keeps_all, -torch.inf)
    logits.masked_fill_(logits < kth, -torch.inf)


def mask_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Sets to 0, in place, tokens outside each row's nucleus: the most likely tokens whose
    probability mass reaches ``top_p`` (vLLM's rule: a token is kept when the mass of the
    tokens before it in descending order is < top_p, so the most likely is always kept).
    ``probs [num_rows, vocab]`` (rows sum to 1); ``top_p`` float32 ``[num_rows]`` in (0, 1].
    """
    keeps_all = top_p >= 1.0
    if probs.is_cuda:
        # A full sort is cheap on a GPU, and avoids the host syncs of the CPU path.
        threshold, _ = _nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p)
    else:
        threshold = _nucleus_threshold_cpu(probs, top_p, keeps_all)
    # p = 1 keeps everything, whatever rounding did to the cumulative sum.
    threshold.masked_fill_(keeps_all.unsqueeze(1), 0.0)
    probs.masked_fill_(probs < threshold, 0.0)


def _nucleus_threshold_cpu(
    probs: torch.Tensor, top_p: torch.Tensor, keeps_all: torch.Tensor
) -> torch.Tensor:
    """Each row's threshold ``[num_rows, 1]`` from ever larger candidate sets (host syncs
    are free on CPU); the rows left after the last set sort all their tokens."""
    vocab = probs.shape[1]
    threshold = torch.zeros(probs.shape[0], 1, dtype=probs.dtype)
    rows = torch.nonzero(~keeps_all).squeeze(1)
    for num_candidates in (*TOP_P_CANDIDATES, vocab):
        if not rows.numel():
            break
        if num_candidates >= vocab:
            candidates = probs[rows].sort(dim=-1, descending=True).values
        else:
            candidates = probs[rows].topk(num_candidates, dim=-1).values
        row_threshold, fits = _nucleus_threshold(candidates, top_p[rows])
        threshold[rows[fits]] = row_threshold[fits]
        rows = rows[~fits]
    return threshold


def _nucleus_threshold(
    sorted_probs: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted_probs [num_rows, n]``: each row's n largest probabilities, descending.
    Returns the smallest kept probability ``[num_rows, 1]`` and whether the nucleus ends
    within these n (bool ``[num_rows]``); where it does not, the threshold is meaningless.
    """
    cum = sorted_probs.cumsum(dim=-1)
    mass_before = cum - sorted_probs
    num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(min=1)
    threshold = sorted_probs.gather(1, num_kept - 1)
    fits = (num_kept < sorted_probs.shape[1]).squeeze(1) | (cum[:, -1] >= top_p)
    return threshold, fits

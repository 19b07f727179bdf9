"""Token embedding and LM head with the vocabulary split over tensor-parallel ranks.

The vocabulary is padded up to a multiple of ``tp_size`` so that every rank holds the same
number of rows (``num_embeddings_per_rank``); rank ``r`` owns token ids
``[r * per_rank, (r + 1) * per_rank)``. Padding rows are zero and never looked up; their
logits are cut off after the gather. No padding to 64 as vLLM does: at TP=1 the parameters
are then exactly the checkpoint's, so ``ModelConfig.num_params`` matches them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.layers.linear import apply_linear
from distserve_rt.layers.weight_utils import FullTensor, check_full_shape, copy_into, read_slice


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(torch.nn.Module):
    """``input_ids [num_tokens] -> [num_tokens, embedding_dim]``; each rank looks up the ids
    it owns (zeros elsewhere) and the partial results are all-reduced."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
        shared_weight: torch.nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        padded = padded_vocab_size(num_embeddings, parallel.tp_size)
        self.num_embeddings_per_rank = padded // parallel.tp_size
        self.vocab_start = parallel.tp_rank * self.num_embeddings_per_rank
        # Rows of this rank that hold real tokens (the last rank may hold padding).
        self.num_real_rows = max(
            0, min(self.num_embeddings_per_rank, num_embeddings - self.vocab_start)
        )
        shape = (self.num_embeddings_per_rank, embedding_dim)
        if shared_weight is not None:  # tied LM head: the embedding's parameter, loaded once
            if tuple(shared_weight.shape) != shape:
                raise ValueError(
                    f"shared_weight has shape {tuple(shared_weight.shape)}, expected {shape}"
                )
            self.weight = shared_weight
            return
        # [num_embeddings_per_rank, embedding_dim]
        weight = torch.empty(shape, dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_ids = (None,)

    def weight_loader(self, param: torch.nn.Parameter, loaded: FullTensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"embeddings take no shard_id, got {shard_id!r}")
        check_full_shape(loaded, (self.num_embeddings, self.embedding_dim))
        rows = self.num_real_rows
        with torch.no_grad():
            param[rows:].zero_()
        if rows:
            copy_into(param[:rows], read_slice(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """``hidden [n, embedding_dim] -> logits [n, num_embeddings]`` float32, gathered over TP.

    With tied embeddings the model passes its embedding's parameter as ``shared_weight``
    (same tensor, loaded once)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, embedding_dim] -> [n, num_embeddings]`` float32 (padding rows dropped)."""
        logits = apply_linear(hidden, self.weight, None)
        logits = self.parallel.all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings].float()

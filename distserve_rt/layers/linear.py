"""Linear layers sharded over tensor parallelism (Megatron-LM's column/row split, vLLM's names).

* `ColumnParallelLinear`: ``W [out, in]`` split by output rows; each rank computes its
  slice of the output features (no communication).
* `RowParallelLinear`: split by input columns; each rank multiplies its slice of the input
  features and the partial sums are all-reduced. Pairs with a column layer before it
  (attention's o_proj after qkv, the MLP's down after gate/up), so one all-reduce per pair.
* `QKVParallelLinear` / `MergedColumnParallelLinear`: several HF projections (q/k/v,
  gate/up) fused into one column-parallel matmul; each part is sharded on its own so rank
  ``r`` holds ``[q_r; k_r; v_r]``.
* `ReplicatedLinear`: the same full weight on every rank (small projections).

Every parameter carries ``weight_loader(param, full_tensor, shard_id=None)``, which reads
this rank's shard out of the full HF tensor (see `layers.weight_utils`), and
``shard_ids``: the shard ids a checkpoint must provide for it (``(None,)`` when unfused).
Weights are ``[out_features_per_rank, in_features_per_rank]`` as in ``torch.nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.layers.weight_utils import (
    FullTensor,
    check_full_shape,
    copy_into,
    default_weight_loader,
    divide,
    read_slice,
)
from distserve_rt.ops.layer_ops import linear as cpu_linear


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``: the CPU op (16-bit weights on our kernel where it is faster than
    oneDNN, see `ops.layer_ops.cpu_linear_backend`), torch's matmul on CUDA."""
    if x.is_cpu and x.dim() == 2:
        return cpu_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _make_param(
    shape: Sequence[int], dtype: torch.dtype, device: Any, loader, shard_ids: Sequence[Any]
) -> torch.nn.Parameter:
    """An uninitialised inference parameter that knows how to load itself (`loader`) and
    which checkpoint shards it needs (`shard_ids`)."""
    param = torch.nn.Parameter(torch.empty(tuple(shape), dtype=dtype, device=device), False)
    param.weight_loader = loader
    param.shard_ids = tuple(shard_ids)
    return param


class _LinearBase(torch.nn.Module):
    """Holds ``weight`` and optional ``bias``; subclasses decide the split and the loader."""

    def __init__(
        self,
        weight_shape: Sequence[int],
        bias_size: int | None,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
        shard_ids: Sequence[Any] = (None,),
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.weight = _make_param(weight_shape, dtype, device, self.weight_loader, shard_ids)
        self.bias = None
        if bias_size is not None:
            self.bias = _make_param((bias_size,), dtype, device, self.weight_loader, shard_ids)

    def weight_loader(self, param: torch.nn.Parameter, loaded: FullTensor, shard_id=None):
        raise NotImplementedError("each linear layer defines how it shards its weights")


class ReplicatedLinear(_LinearBase):
    """``y = x W^T + b`` with the full weight on every rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        super().__init__(
            (out_features, in_features), out_features if bias else None, parallel, dtype, device
        )

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias)


class ColumnParallelLinear(_LinearBase):
    """Output features split over TP ranks: ``[.., in] -> [.., out / tp]``
    (``gather_output=True`` all-gathers to ``[.., out]``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
        gather_output: bool = False,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = divide(out_features, parallel.tp_size, "out_features")
        self.gather_output = gather_output
        super().__init__(
            (self.out_per_rank, in_features),
            self.out_per_rank if bias else None,
            parallel,
            dtype,
            device,
        )

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"ColumnParallelLinear takes no shard_id, got {shard_id!r}")
        full = (self.out_features, self.in_features)[: param.dim()]
        check_full_shape(loaded, full)
        start = self.parallel.tp_rank * self.out_per_rank
        copy_into(param, read_slice(loaded, 0, start, self.out_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = apply_linear(x, self.weight, self.bias)
        return self.parallel.all_gather(out, dim=-1) if self.gather_output else out


class MergedColumnParallelLinear(_LinearBase):
    """Several column-parallel projections of the same input fused into one matmul (the MLP's
    gate and up). Shard ``i`` of the checkpoint is ``output_sizes[i]`` rows; rank ``r``
    holds ``[part_0 rows of r; part_1 rows of r; ...]``."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        *,
        bias: bool,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.sizes_per_rank = tuple(
            divide(size, parallel.tp_size, f"output size {i}")
            for i, size in enumerate(output_sizes)
        )
        total = sum(self.sizes_per_rank)
        shard_ids = tuple(range(len(output_sizes)))
        super().__init__(
            (total, in_features), total if bias else None, parallel, dtype, device, shard_ids
        )

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id not in range(len(self.output_sizes)):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id!r}")
        full = (self.output_sizes[shard_id], self.in_features)[: param.dim()]
        check_full_shape(loaded, full, f"shard {shard_id}")
        size = self.sizes_per_rank[shard_id]
        offset = sum(self.sizes_per_rank[:shard_id])
        part = read_slice(loaded, 0, self.parallel.tp_rank * size, size)
        copy_into(param.narrow(0, offset, size), part, f"shard {shard_id}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused, split by heads: rank ``r`` holds query heads
    ``[r * num_heads / tp, ...)`` and the matching kv heads. Output ``[.., (num_heads +
    2 * num_kv_heads) / tp * head_dim]``. Shard ids "q", "k", "v".

    TP must divide both head counts: a rank holding part of a head, or a kv head shared by
    ranks, would need communication inside attention (vLLM replicates kv heads instead;
    not done here)."""

    _SHARD_INDEX = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        tp = parallel.tp_size
        self.num_heads = divide(num_heads, tp, "num_heads (attention heads)")
        self.num_kv_heads = divide(num_kv_heads, tp, "num_kv_heads (key/value heads)")
        self.head_dim = head_dim
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(
            hidden_size, (q, kv, kv), bias=bias, parallel=parallel, dtype=dtype, device=device
        )
        self.weight.shard_ids = ("q", "k", "v")
        if self.bias is not None:
            self.bias.shard_ids = ("q", "k", "v")

    @property
    def q_size(self) -> int:
        """Query features of this rank."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Key (or value) features of this rank."""
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id not in self._SHARD_INDEX:
            raise ValueError(f"shard_id must be one of 'q', 'k', 'v', got {shard_id!r}")
        super().weight_loader(param, loaded, self._SHARD_INDEX[shard_id])


class RowParallelLinear(_LinearBase):
    """Input features split over TP ranks: ``[.., in / tp] -> [.., out]``, partial sums
    all-reduced (``reduce_results``); the bias is added once, after the reduction."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: Any,
        reduce_results: bool = True,
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, parallel.tp_size, "in_features")
        if bias and not reduce_results:
            raise ValueError(
                "RowParallelLinear with a bias needs reduce_results=True (the bias "
                "is added once, after the all-reduce)"
            )
        self.reduce_results = reduce_results
        super().__init__(
            (out_features, self.in_per_rank),
            out_features if bias else None,
            parallel,
            dtype,
            device,
        )

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param is self.bias:  # replicated: every rank adds the whole bias after the reduce
            default_weight_loader(param, loaded, shard_id)
            return
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear takes no shard_id, got {shard_id!r}")
        check_full_shape(loaded, (self.out_features, self.in_features))
        start = self.parallel.tp_rank * self.in_per_rank
        copy_into(param, read_slice(loaded, 1, start, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = apply_linear(x, self.weight, None)
        if self.reduce_results:
            out = self.parallel.all_reduce(out)
        return out if self.bias is None else out + self.bias

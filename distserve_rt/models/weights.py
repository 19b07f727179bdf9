"""Checkpoint tensor -> parameter mapping, and loading a stage's parameters through it.

Each model class declares, for a pipeline stage, a *weight map*: HF tensor name ->
`WeightTarget` (our parameter, the shard id inside a fused parameter, the tensor's full
shape). The map is the single source of truth for loading real checkpoints (names, shapes,
which tensors are missing) and for generating dummy weights (`models.dummy_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distserve_rt.layers.weight_utils import FullTensor, WeightShapeError, full_shape


@dataclass(frozen=True, slots=True)
class WeightTarget:
    """Where one checkpoint tensor goes."""

    param: str
    """Our parameter's name (``model.named_parameters()``)."""
    shard_id: Any
    """Part of a fused parameter ("q"/"k"/"v", 0/1 for gate/up) or None."""
    shape: tuple[int, ...]
    """Full shape of the checkpoint tensor (whole model, TP = 1)."""


WeightMap = dict[str, WeightTarget]


def add_layer_entries(
    weight_map: WeightMap,
    layer_range: tuple[int, int],
    hf_prefix: str,
    entries: Iterable[tuple[str, str, Any, tuple[int, ...]]],
) -> None:
    """Adds ``hf_prefix{g}.{hf_suffix}`` -> ``layers.{g - start}.{our_suffix}`` for every
    global layer ``g`` of ``layer_range``; `entries` are (hf_suffix, our_suffix, shard_id,
    shape) tuples, the same for every layer."""
    entries = list(entries)
    start, end = layer_range
    for layer in range(start, end):
        for hf_suffix, our_suffix, shard_id, shape in entries:
            name = f"{hf_prefix}{layer}.{hf_suffix}"
            weight_map[name] = WeightTarget(f"layers.{layer - start}.{our_suffix}", shard_id, shape)


def check_checkpoint(
    stage_map: WeightMap,
    whole_map: WeightMap,
    shapes: Mapping[str, tuple[int, ...]],
    is_ignored,
    source: str,
) -> None:
    """Before reading any data: every tensor of the stage is present with the expected
    shape, and the checkpoint holds nothing the model does not know (tensors of other
    pipeline stages and `is_ignored` ones are fine). `shapes` is keyed by normalised name.
    Raises ValueError naming the tensors."""
    unexpected = [n for n in shapes if n not in whole_map and not is_ignored(n)]
    if unexpected:
        raise ValueError(
            f"{source} has {len(unexpected)} tensor(s) this model does not use: "
            f"{_first(unexpected)} (a different architecture or a modified checkpoint?)"
        )
    missing = [n for n in stage_map if n not in shapes]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s): {_first(missing)}")
    for name, target in stage_map.items():
        if tuple(shapes[name]) != target.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(shapes[name])}, expected "
                f"{target.shape} for this config.json"
            )


class RowSlice:
    """Rows ``[start, start + num_rows)`` of a full checkpoint tensor, read lazily: one part
    of a tensor that a checkpoint stores fused (Phi-3's ``qkv_proj``), so it loads like the
    separate tensors other checkpoints have (the `SliceableTensor` interface)."""

    def __init__(self, base: FullTensor, start: int, num_rows: int) -> None:
        self.base, self.start, self.num_rows = base, start, num_rows
        self._rest = full_shape(base)[1:]

    def get_shape(self) -> list[int]:
        return [self.num_rows, *self._rest]

    def __getitem__(self, index: Any) -> torch.Tensor:
        parts = index if isinstance(index, tuple) else (index,)
        rows = parts[0] if parts else slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"RowSlice takes [a:b] or [:, a:b] slices, got {index!r}")
        start, stop, _ = rows.indices(self.num_rows)
        return self.base[(slice(self.start + start, self.start + stop), *parts[1:])]


def split_rows(
    name: str, tensor: FullTensor, parts: list[tuple[str, int]]
) -> dict[str, FullTensor]:
    """The fused tensor `name` as ``{part name: RowSlice}``, `parts` being (name, rows) in
    order; ValueError when the rows do not add up (a config.json that does not match)."""
    shape = full_shape(tensor)
    expected = sum(rows for _, rows in parts)
    if not shape or shape[0] != expected:
        raise ValueError(
            f"fused tensor {name!r} has shape {shape}, expected {expected} rows "
            f"({' + '.join(f'{rows} {_module(part)}' for part, rows in parts)}) for this "
            "config.json"
        )
    out: dict[str, FullTensor] = {}
    start = 0
    for part, rows in parts:
        out[part] = RowSlice(tensor, start, rows)
        start += rows
    return out


def _module(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``."""
    return name.rsplit(".", 2)[-2] if "." in name else name


def _first(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_stage_weights(
    model: torch.nn.Module, stage_map: WeightMap, tensors: Mapping[str, FullTensor]
) -> None:
    """Reads every tensor of `stage_map` from `tensors` (normalised names -> full tensors,
    lazily read) into the model's parameters through their ``weight_loader``s."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, Any]] = set()
    for name, target in stage_map.items():
        param = params[target.param]
        try:
            param.weight_loader(param, tensors[name], target.shard_id)
        except WeightShapeError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from exc
        loaded.add((target.param, target.shard_id))
    _check_all_loaded(params, loaded)


def _check_all_loaded(params: Mapping[str, torch.nn.Parameter], loaded: set) -> None:
    """A parameter whose weight map is incomplete would keep uninitialised memory: a bug in
    the model's map, so say which one rather than serve garbage."""
    for pname, param in params.items():
        for shard_id in param.shard_ids:
            if (pname, shard_id) not in loaded:
                raise RuntimeError(
                    f"parameter {pname!r} (shard {shard_id!r}) has no checkpoint tensor in the "
                    "model's weight map"
                )


def shapes_of(tensors: Mapping[str, FullTensor]) -> dict[str, tuple[int, ...]]:
    return {name: full_shape(t) for name, t in tensors.items()}

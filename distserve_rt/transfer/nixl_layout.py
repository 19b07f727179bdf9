"""Descriptor lists of the `nixl` transport: which contiguous runs of the peer's pool a
transfer reads, and where they land in the staging buffer.

A pool is block-major, ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``,
so a `KVSlice` of a block is a few contiguous runs. The coarsest run that fits the slice is
used (fewer descriptors, fewer network operations):

- every layer and head of the source: one run per block;
- every head, some layers: one run per (block, layer), K and V together;
- some heads: one run per (block, layer, K|V).

The remote descriptor list covers every unit of every source block (prepared once per peer
and run kind, then addressed by index, as NIXL's prepared lists are meant to be used); a
transfer's runs land back to back in the staging buffer, which therefore holds
``[num_pairs, num_layers, 2, num_heads, block_size, head_dim]`` of the slice.
Pure numpy: testable without NIXL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distserve_rt.transfer.descriptor import PoolDescriptor, SliceArgs


@dataclass(frozen=True, slots=True)
class RunLayout:
    """How one slice of a source block splits into contiguous runs."""

    kind: tuple
    """Cache key of the remote list: ("block",), ("layer",) or ("head", head_start, num_heads)."""
    run_bytes: int
    units_per_block: int
    """Entries of the remote list per source block."""
    first_unit: int
    """Index, within a block, of the slice's first run."""
    num_units: int
    """Runs per block the slice reads (consecutive indices)."""
    unit_offsets: np.ndarray
    """int64 [units_per_block]: byte offset of each unit inside a block."""


def run_layout(src: PoolDescriptor, slice_args: SliceArgs) -> RunLayout:
    src_l0, _, num_layers, src_h0, _, num_heads = slice_args
    head_bytes = src.head_bytes
    layer_bytes = 2 * src.num_kv_heads * head_bytes  # K and V of every head of one layer
    if num_heads == src.num_kv_heads and num_layers == src.num_layers:
        offsets = np.zeros(1, dtype=np.int64)
        return RunLayout(("block",), src.num_layers * layer_bytes, 1, 0, 1, offsets)
    if num_heads == src.num_kv_heads:
        offsets = np.arange(src.num_layers, dtype=np.int64) * layer_bytes
        return RunLayout(("layer",), layer_bytes, src.num_layers, src_l0, num_layers, offsets)
    # One run per (layer, K|V): heads [src_h0, +num_heads) of that layer's K or V.
    kv_bytes = src.num_kv_heads * head_bytes
    offsets = np.arange(2 * src.num_layers, dtype=np.int64) * kv_bytes + src_h0 * head_bytes
    return RunLayout(
        ("head", src_h0, num_heads), num_heads * head_bytes, 2 * src.num_layers,
        2 * src_l0, 2 * num_layers, offsets,
    )  # fmt: skip


def remote_descs(src: PoolDescriptor, base_addr: int, layout: RunLayout) -> np.ndarray:
    """uint64 [num_blocks * units_per_block, 3] (address, length, device id) of every unit
    of every source block, in index order."""
    block_addrs = base_addr + np.arange(src.num_blocks, dtype=np.int64) * src.block_stride_bytes
    addrs = (block_addrs[:, None] + layout.unit_offsets[None, :]).reshape(-1)
    descs = np.empty((addrs.size, 3), dtype=np.uint64)
    descs[:, 0] = addrs
    descs[:, 1] = layout.run_bytes
    descs[:, 2] = 0  # host memory: NIXL's device id 0
    return descs


def remote_indices(src_block_ids: np.ndarray, layout: RunLayout) -> np.ndarray:
    """int32 [num_pairs * num_units]: the runs a transfer reads, in staging order."""
    units = layout.first_unit + np.arange(layout.num_units, dtype=np.int64)
    indices = src_block_ids.astype(np.int64)[:, None] * layout.units_per_block + units[None, :]
    return indices.reshape(-1).astype(np.int32)


def staging_descs(staging_addr: int, run_bytes: int, num_runs: int) -> np.ndarray:
    """uint64 [num_runs, 3]: back-to-back runs from `staging_addr`."""
    descs = np.empty((num_runs, 3), dtype=np.uint64)
    descs[:, 0] = staging_addr + np.arange(num_runs, dtype=np.uint64) * np.uint64(run_bytes)
    descs[:, 1] = run_bytes
    descs[:, 2] = 0
    return descs

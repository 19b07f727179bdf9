"""A minimal paged-KV driver for model tests: builds `AttentionMetadata` from a
`BlockManager` for mixed steps (prefill chunks first, then decodes) and runs a model stage.

Not the engine's model runner (that lives in ``worker/``): just enough to feed prefill,
chunked prefill and decode through the real kernels and cache layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.kv_cache import KVCacheSpec, allocate_kv_pool
from distserve_rt.layers.attention import AttentionMetadata


class PagedRunner:
    """Runs one model stage (or a list of PP stages, chained) over a private KV pool."""

    def __init__(self, stages, *, num_blocks: int = 64, block_size: int = 16) -> None:
        self.stages = list(stages) if isinstance(stages, Sequence) else [stages]
        self.block_manager = BlockManager(num_blocks, block_size, watermark=0.0)
        self.pools = [self._pool(stage, num_blocks, block_size) for stage in self.stages]
        self._known: set[int] = set()

    @staticmethod
    def _pool(stage, num_blocks: int, block_size: int) -> torch.Tensor:
        attn = stage.layers[0].self_attn.attn
        param = next(stage.parameters())
        spec = KVCacheSpec(
            num_blocks=num_blocks,
            num_layers=stage.num_local_layers,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            block_size=block_size,
            dtype=param.dtype,
        )
        return allocate_kv_pool(spec, param.device)

    def step(
        self,
        prefills: Sequence[tuple[int, Sequence[int]]] = (),
        decodes: Sequence[tuple[int, int]] = (),
    ) -> torch.Tensor:
        """Prefill chunks ``(seq_id, token_ids)`` (a new seq, or the next chunk of one) and
        decodes ``(seq_id, token_id)``; returns float32 logits of every token, in order."""
        bm = self.block_manager
        seq_ids = [s for s, _ in prefills] + [s for s, _ in decodes]
        counts = [len(t) for _, t in prefills] + [1] * len(decodes)
        for seq in seq_ids:
            if seq not in self._known:
                bm.allocate(seq, 0)
                self._known.add(seq)
        prefix = [bm.num_tokens(s) for s, _ in prefills]
        decode_prefix = [bm.num_tokens(s) for s, _ in decodes]
        result = bm.append_slots_batch(seq_ids, counts)
        assert result is not None, "test pool too small"
        tokens = [t for _, chunk in prefills for t in chunk] + [t for _, t in decodes]
        positions = [
            p + i for p, (_, c) in zip(prefix, prefills, strict=True) for i in range(len(c))
        ]
        positions += decode_prefix
        metadata = self._metadata(prefills, decodes, prefix, result.slot_mapping)
        return self._run(torch.tensor(tokens), torch.tensor(positions), metadata)

    def _metadata(self, prefills, decodes, prefix, slot_mapping) -> AttentionMetadata:
        bm = self.block_manager
        lens = [len(c) for _, c in prefills]
        cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()])
        p_ids, d_ids = [s for s, _ in prefills], [s for s, _ in decodes]
        metadata = AttentionMetadata(
            num_prefill_tokens=sum(lens),
            num_decode_tokens=len(decodes),
            slot_mapping=torch.from_numpy(slot_mapping),
        )
        if prefills:
            metadata.prefill_cu_seqlens = cu.to(torch.int32)
            metadata.prefill_max_seqlen = max(lens)
            metadata.prefill_prefix_lens = torch.tensor(prefix, dtype=torch.int32)
            metadata.prefill_block_table = torch.from_numpy(bm.block_tables(p_ids))
        if decodes:
            seq_lens = bm.seq_lens(d_ids)
            metadata.decode_block_table = torch.from_numpy(bm.block_tables(d_ids))
            metadata.decode_seq_lens = torch.from_numpy(seq_lens)
            metadata.decode_max_seq_len = int(seq_lens.max())
        device = self.pools[0].device
        for field in ("slot_mapping", "prefill_cu_seqlens", "prefill_prefix_lens"):
            setattr(metadata, field, _to(getattr(metadata, field), device))
        for field in ("prefill_block_table", "decode_block_table", "decode_seq_lens"):
            setattr(metadata, field, _to(getattr(metadata, field), device))
        return metadata

    def _run(self, input_ids, positions, metadata) -> torch.Tensor:
        device = self.pools[0].device
        input_ids, positions = input_ids.to(device), positions.to(device)
        hidden = None
        for stage, pool in zip(self.stages, self.pools, strict=True):
            ids = input_ids if hidden is None else None
            hidden = stage(ids, positions, pool, metadata, hidden)
        return self.stages[-1].compute_logits(hidden)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def greedy_generate(runner: PagedRunner, prompt: Sequence[int], num_new_tokens: int) -> list[int]:
    """Greedy tokens after `prompt`: one prefill, then token-by-token decode."""
    logits = runner.step(prefills=[(0, list(prompt))])
    tokens = [int(logits[-1].argmax())]
    for _ in range(num_new_tokens - 1):
        logits = runner.step(decodes=[(0, tokens[-1])])
        tokens.append(int(logits[-1].argmax()))
    return tokens

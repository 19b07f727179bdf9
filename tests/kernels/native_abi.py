"""The keyword ABI of the native ops (include/distserve_rt/op_args.h), shared by the tests
that pin it: each op's arguments by name, in the order its docstring lists them."""

from __future__ import annotations

import re

# Both modules; the CUDA module adds `stream` (docs: "The native ABI every op follows").
ABI = {
    "write_kv": "key value kv_cache slot_mapping num_tokens num_kv_heads head_dim "
    "key_token_stride value_token_stride num_blocks block_size kv_block_stride dtype",
    "copy_blocks": "src dst block_mapping num_pairs src_num_blocks dst_num_blocks "
    "src_block_stride_bytes dst_block_stride_bytes block_bytes",
    "prefill_attention": "query key value out cu_seqlens batch num_tokens max_seqlen_q "
    "num_heads num_kv_heads head_dim query_token_stride key_token_stride value_token_stride "
    "out_token_stride softmax_scale kv_cache block_table prefix_lens slot_mapping num_blocks "
    "block_size kv_block_stride max_blocks_per_seq dtype",
    "decode_attention_workspace_bytes": "batch num_heads head_dim max_seq_len",
    "decode_attention": "query out kv_cache block_table seq_lens workspace workspace_bytes "
    "batch max_seq_len num_heads num_kv_heads head_dim query_stride out_stride softmax_scale "
    "num_blocks block_size kv_block_stride max_blocks_per_seq dtype",
}
CUDA_ONLY = {"copy_blocks_memcpy_batch": ABI["copy_blocks"]}


def signature_line(fn) -> str:
    """The first docstring line, where pybind11 (or op_bindings.h) writes the signature."""
    return fn.__doc__.splitlines()[0]


def arg_names(fn) -> list[str]:
    """The names of `fn`'s arguments, from its signature line `name(*, a: int, ...) -> T`."""
    signature = signature_line(fn)
    inner = signature[signature.index("(") + 1 : signature.rindex(")")]
    return re.findall(r"(\w+):", inner)

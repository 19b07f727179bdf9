"""Kernels behind one API for CPU and CUDA, dispatched by the device of the tensors.

Every op validates its arguments (ValueError naming the argument, the value and what is
allowed) and has a plain-torch reference (`reference_*`) that tests compare against.
"""

from distserve_rt._native import get_num_threads, set_num_threads
from distserve_rt.ops.cache import copy_blocks, write_kv
from distserve_rt.ops.decode_attention import decode_attention
from distserve_rt.ops.prefill_attention import prefill_attention

__all__ = [
    "copy_blocks",
    "decode_attention",
    "get_num_threads",
    "prefill_attention",
    "set_num_threads",
    "write_kv",
]

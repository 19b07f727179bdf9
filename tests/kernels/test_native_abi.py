"""The native ops are called by keyword only, so two ints cannot be swapped silently.

Every op of `_C` (and of `_cuda` when it is built) with more than one argument refuses a
positional call; the ops of include/distserve_rt/op_args.h also refuse an unknown, missing
or wrongly typed keyword with a TypeError naming it, before any argument check or kernel
runs. Their docstrings list the arguments by name (`name: type`), which is the ABI pinned
here and in test_cuda_module.py.
"""

from __future__ import annotations

import pytest
import torch

from distserve_rt import _native
from tests.kernels.native_abi import ABI, CUDA_ONLY, arg_names, signature_line


def _modules() -> list[tuple[str, object, list[str]]]:
    """(name, module, extra keywords of its ops): the CPU module, and the CUDA one if built."""
    found = [("_C", _native.cpu_module(), [])]
    if _native.has_cuda_module():
        found.append(("_cuda", _native.cuda_module(), ["stream"]))
    return found


# Module-level functions outside the kernel ops, still positional: the transfer engines'
# argument check takes (pool, slice) tuples and belongs with the transfer ABI, which has its
# own classes (ShmTransferEngine, IpcTransferEngine) and is not covered here.
NOT_KEYWORD_YET = {"check_ipc_transfer_args"}


def _functions(module) -> list[str]:
    """The module-level functions (classes such as BlockManager are not ops)."""
    return sorted(
        name
        for name in dir(module)
        if not name.startswith("_")
        and name not in NOT_KEYWORD_YET
        and type(getattr(module, name)).__name__ == "builtin_function_or_method"
    )


MODULES = _modules()
OPS = [(mod_name, name) for mod_name, module, _ in MODULES for name in _functions(module)]
KEYWORD_OPS = [
    (mod_name, name)
    for mod_name, _, _ in MODULES
    for name in (ABI if mod_name == "_C" else {**ABI, **CUDA_ONLY})
]


def _module(mod_name: str):
    return next(module for name, module, _ in MODULES if name == mod_name)


def _extra(mod_name: str) -> list[str]:
    return next(extra for name, _, extra in MODULES if name == mod_name)


def _zero_kwargs(mod_name: str, op: str) -> dict[str, int]:
    """Every keyword of `op` set to 0: a complete call whose values fail the launcher's
    checks (ValueError) before any memory is touched."""
    return dict.fromkeys(arg_names(getattr(_module(mod_name), op)), 0)


@pytest.mark.parametrize(("mod_name", "op"), OPS)
def test_every_op_names_its_arguments_and_refuses_positional_calls(mod_name, op):
    fn = getattr(_module(mod_name), op)
    names = arg_names(fn)
    if len(names) < 2:  # set_num_threads(n), device_count(): nothing to swap
        return
    assert signature_line(fn).startswith(f"{op}(*, "), signature_line(fn)
    with pytest.raises(TypeError):
        fn(*[0] * len(names))


@pytest.mark.parametrize(("mod_name", "op"), KEYWORD_OPS)
def test_op_arguments_are_the_abi(mod_name, op):
    names = arg_names(getattr(_module(mod_name), op))
    assert names == {**ABI, **CUDA_ONLY}[op].split() + _extra(mod_name)


@pytest.mark.parametrize(("mod_name", "op"), KEYWORD_OPS)
def test_positional_call_is_a_type_error_naming_the_rule(mod_name, op):
    fn = getattr(_module(mod_name), op)
    message = rf"{op}\(\) takes keyword arguments only, got 1 positional"
    with pytest.raises(TypeError, match=message):
        fn(0, **_zero_kwargs(mod_name, op))


@pytest.mark.parametrize(("mod_name", "op"), KEYWORD_OPS)
def test_unknown_keyword_is_a_type_error_naming_it(mod_name, op):
    """A misspelt name, or one from another op's ABI, cannot reach a field by position."""
    kwargs = _zero_kwargs(mod_name, op)
    kwargs["num_head"] = 0
    message = rf"{op}\(\) got an unexpected keyword argument 'num_head'; allowed: "
    with pytest.raises(TypeError, match=message):
        getattr(_module(mod_name), op)(**kwargs)


@pytest.mark.parametrize(("mod_name", "op"), KEYWORD_OPS)
def test_missing_keyword_is_a_type_error_naming_it(mod_name, op):
    kwargs = _zero_kwargs(mod_name, op)
    last = list(kwargs)[-1]
    del kwargs[last]
    with pytest.raises(TypeError, match=rf"{op}\(\) missing keyword argument '{last}'"):
        getattr(_module(mod_name), op)(**kwargs)


@pytest.mark.parametrize(("mod_name", "op"), KEYWORD_OPS)
def test_renamed_keyword_is_refused_even_when_the_count_matches(mod_name, op):
    """Replacing one name by an unknown one keeps the count right: still refused, by name."""
    kwargs = _zero_kwargs(mod_name, op)
    first = next(iter(kwargs))
    kwargs["not_" + first] = kwargs.pop(first)
    with pytest.raises(TypeError, match=rf"missing keyword argument '{first}'"):
        getattr(_module(mod_name), op)(**kwargs)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("num_tokens", 1.5, r"argument 'num_tokens' must be an int, got 1.5"),
        ("key", -1, r"argument 'key' must be an int >= 0 \(an address or handle\), got -1"),
        ("dtype", "bf16", r"argument 'dtype' must be an int, got 'bf16'"),
    ],
)
def test_wrongly_typed_keyword_is_a_type_error_naming_it(keyword, value, message):
    kwargs = _zero_kwargs("_C", "write_kv")
    kwargs[keyword] = value
    with pytest.raises(TypeError, match=r"write_kv\(\) " + message):
        _native.cpu_module().write_kv(**kwargs)


def test_each_keyword_reaches_its_own_field():
    """The launcher names the field it checks with the value the call gave that keyword:
    distinct bad values for two same-typed neighbours come back under the right names."""
    module = _native.cpu_module()
    base = dict(
        src=1 << 20, dst=1 << 21, block_mapping=1 << 22, num_pairs=1, src_num_blocks=4,
        dst_num_blocks=4, src_block_stride_bytes=64, dst_block_stride_bytes=64, block_bytes=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"src_block_stride_bytes \(31\) must be >= block_bytes"):
        module.copy_blocks(**{**base, "src_block_stride_bytes": 31, "dst_block_stride_bytes": 47})
    with pytest.raises(ValueError, match=r"dst_block_stride_bytes \(47\) must be >= block_bytes"):
        module.copy_blocks(**{**base, "dst_block_stride_bytes": 47})
    with pytest.raises(ValueError, match=r"src_num_blocks must be >= 0, got -3"):
        module.copy_blocks(**{**base, "src_num_blocks": -3, "dst_num_blocks": -5})
    with pytest.raises(ValueError, match=r"dst_num_blocks must be >= 0, got -5"):
        module.copy_blocks(**{**base, "dst_num_blocks": -5})


def test_sizes_go_where_their_names_say():
    """head_dim=128, max_seq_len=8192 needs split scratch; the same two ints the other way
    round (a 128-token context) needs none. A positional ABI would take either order."""
    size = _native.cpu_module().decode_attention_workspace_bytes
    needed = size(batch=1, num_heads=32, head_dim=128, max_seq_len=8192)
    assert needed > 0
    assert size(max_seq_len=8192, head_dim=128, num_heads=32, batch=1) == needed
    assert size(batch=1, num_heads=32, head_dim=8192, max_seq_len=128) == 0


def test_wrappers_call_by_keyword():
    """The ops of distserve_rt.ops run through the keyword-only bindings (a positional
    call would raise): one small call of each, end to end."""
    from distserve_rt import ops

    key = torch.randn(2, 1, 8)
    cache = torch.zeros(2, 2, 1, 4, 8)
    ops.write_kv(key, key, cache, torch.tensor([0, 5]))
    assert torch.equal(cache[1, 0, 0, 1], key[1, 0])
    ops.copy_blocks(cache, cache, [[1, 0]])
    assert torch.equal(cache[0], cache[1])
    out = ops.decode_attention(
        torch.randn(1, 1, 8), cache, torch.tensor([[1]], dtype=torch.int32),
        torch.tensor([2], dtype=torch.int32),
    )  # fmt: skip
    assert out.shape == (1, 1, 8)
    out = ops.prefill_attention(key, key, key, torch.tensor([0, 2], dtype=torch.int32))
    assert out.shape == (2, 1, 8)

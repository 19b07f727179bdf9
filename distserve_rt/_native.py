"""Access to the native modules and the conventions of their ABI.

Native functions take raw data pointers, shapes and strides (never torch tensors), so one
build works with any torch version. This module turns tensors into those arguments and
picks the module for a device: ``_C`` (CPU, always built) or ``_cuda`` (built when nvcc was
found; imported lazily so that ``import distserve_rt`` works with no GPU).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Must match drt::DType in include/distserve_rt/common.h.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
}

_cuda_module: ModuleType | None = None
_cuda_import_error: str | None = None


def cpu_module() -> ModuleType:
    from distserve_rt import _C

    return _C


def cuda_module() -> ModuleType:
    """The CUDA module; raises RuntimeError saying why when it cannot be used."""
    global _cuda_module, _cuda_import_error
    if _cuda_module is not None:
        return _cuda_module
    if _cuda_import_error is None:
        try:
            _cuda_module = importlib.import_module("distserve_rt._cuda")
            return _cuda_module
        except ImportError as exc:
            _cuda_import_error = (
                f"the CUDA module distserve_rt._cuda is not available ({exc}); it is built "
                "when nvcc is found at install time (force with DRT_CUDA=1)"
            )
    raise RuntimeError(_cuda_import_error)


def has_cuda_module() -> bool:
    try:
        cuda_module()
    except RuntimeError:
        return False
    return True


def module_for(device: torch.device) -> ModuleType:
    """The native module that runs ops on `device` (no silent fallback to another device)."""
    if device.type == "cpu":
        return cpu_module()
    if device.type == "cuda":
        return cuda_module()
    raise ValueError(f"device {device} is not supported; distserve_rt ops run on cpu or cuda")


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def ptr(tensor: torch.Tensor | None) -> int:
    """Data pointer as an int (0 for None), what native functions take."""
    return 0 if tensor is None else tensor.data_ptr()


def set_num_threads(num_threads: int) -> None:
    """Threads used by the CPU kernels (OpenMP), for calls from any Python thread.

    Default: OMP_NUM_THREADS or all cores. torch's CPU build shares the same OpenMP runtime,
    so also set ``torch.set_num_threads`` when torch ops run between ours."""
    cpu_module().set_num_threads(int(num_threads))


def get_num_threads() -> int:
    return cpu_module().get_num_threads()


def call(name: str, device: torch.device, **kwargs: object) -> object:
    """Calls native function `name` on the module for `device`, by keyword.

    Both modules export the same names with the same keyword-only arguments (the fields of
    include/distserve_rt/op_args.h); the CUDA ones take one more, ``stream``, the current
    stream of `device` (as cudaStream_t), so kernels order after the caller's work without
    a synchronisation.
    """
    module = module_for(device)
    if device.type != "cuda":
        return getattr(module, name)(**kwargs)
    # torch reports every device's default stream as 0, so the launcher can only know which
    # GPU a default-stream call is for from the current device: make it the tensors' device.
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        return getattr(module, name)(**kwargs, stream=stream)

"""Builds distserve_rt's native modules with CMake + ninja.

Environment:
  DRT_CUDA=1 forces the CUDA module (the build fails if nvcc is missing), DRT_CUDA=0 skips
  it; unset builds it when nvcc is found.
  DRT_CPU_ARCH overrides -march for the CPU kernels (default: native).
  DRT_CUDA_ARCHS overrides the CUDA architectures (default: "80;90a").
  DRT_BUILD_JOBS sets ninja's parallelism (default: the machine's cores).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(name: str) -> str:
    """The pinned tool installed beside this Python (requirements/build.txt), else PATH's."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is required to build distserve_rt (pip install {name})")
    return found


def _cuda_mode() -> str:
    value = os.environ.get("DRT_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "AUTO"
    if value in ("1", "on", "true", "yes"):
        return "ON"
    if value in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"DRT_CUDA={value!r} is not understood; use 1, 0 or leave it unset")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake project builds every native module into the package folder."""

    def run(self) -> None:
        cmake = _tool("cmake")
        # _C's path tells us where the package folder is (in-place or build/lib).
        out_dir = Path(self.get_ext_fullpath("distserve_rt._C")).resolve().parent
        # A fixed folder (not pip's temporary one) so that rebuilds are incremental.
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDRT_OUTPUT_DIR={out_dir}",
            f"-DDRT_CUDA={_cuda_mode()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if "DRT_CPU_ARCH" in os.environ:
            args.append(f"-DDRT_CPU_ARCH={os.environ['DRT_CPU_ARCH']}")
        if "DRT_CUDA_ARCHS" in os.environ:
            args.append(f"-DDRT_CUDA_ARCHS={os.environ['DRT_CUDA_ARCHS']}")
        subprocess.check_call(args)
        jobs = os.environ.get("DRT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])


setup(
    ext_modules=[CMakeExtension("distserve_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
)

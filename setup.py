"""Build of lowbit._C.

CUDA sources are compiled when torch was built with CUDA and nvcc is found;
otherwise (or with LOWBIT_FORCE_CPU=1) a CPU-only extension is built.
TORCH_CUDA_ARCH_LIST is honoured; the default covers Ampere and newer.
"""
import glob
import os
import shutil
import sys

from setuptools import setup
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _truthy("LOWBIT_FORCE_CPU"):
        return False, "LOWBIT_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, "this torch was built without CUDA"
    if cpp_extension.CUDA_HOME is None or not (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    ):
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _write_build_info(with_cuda, archs, reason):
    path = os.path.join(ROOT, "python", "lowbit", "_build_info.py")
    text = (
        "# Written by setup.py at build time.\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"BUILT_WITH_TORCH = {torch.__version__!r}\n"
        f"BUILT_WITH_CUDA = {torch.version.cuda if with_cuda else None!r}\n"
        f"CPU_ONLY_REASON = {reason!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def _extension():
    with_cuda, reason = _want_cuda()
    cxx = ["-O3", "-std=c++17"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = _sources("*.cpp")
    if not with_cuda:
        _write_build_info(False, "", reason)
        print(f"lowbit: building CPU-only ({reason})", file=sys.stderr)
        return cpp_extension.CppExtension(
            "lowbit._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, py_limited_api=False
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _write_build_info(True, archs, "")
    print(f"lowbit: building with CUDA {torch.version.cuda} for archs {archs}", file=sys.stderr)
    # No fast-math: the quantizers must round exactly as the CPU reference does.
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "-DLOWBIT_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "lowbit._C",
        sources + _sources("*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DLOWBIT_WITH_CUDA"], "nvcc": nvcc},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)

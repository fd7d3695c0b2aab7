"""Build facts: what lowbit._C was compiled with, and what this process sees."""
import torch

try:
    from . import _build_info as _bi
except ImportError:  # built by something other than setup.py
    _bi = None


def cuda_available() -> bool:
    """True when CUDA kernels were compiled into lowbit._C (a GPU need not be present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lowbit::quantize_4bit", "CUDA")


def info() -> str:
    """A short report of the build and the runtime, one fact per line."""
    from . import __version__

    lines = [
        f"lowbit {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda})",
        f"CUDA kernels compiled: {'yes' if cuda_available() else 'no'}",
    ]
    if _bi is not None:
        if _bi.WITH_CUDA:
            lines.append(f"built for CUDA {_bi.BUILT_WITH_CUDA}, archs {_bi.CUDA_ARCHS}")
        else:
            lines.append(f"CPU-only build: {_bi.CPU_ONLY_REASON}")
        lines.append(f"built with torch {_bi.BUILT_WITH_TORCH}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("GPU: none visible")
    ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lowbit::"))
    lines.append("ops: " + ", ".join(ops))
    return "\n".join(lines)

"""lowbit: QLoRA toolkit for PyTorch.

NF4/FP4 4-bit weights with double-quantized scales (byte-compatible with
bitsandbytes checkpoints), 4-bit matmul kernels, and the Python around them.
"""
import torch  # noqa: F401  (first: lowbit._C links against libtorch)

from . import _C  # noqa: F401  (loads the op library: torch.ops.lowbit)
from . import ops  # noqa: F401  (fake kernels and autograd registrations)
from . import functional
from . import optim
from ._info import cuda_available, info
from .functional import QuantState, dequantize_4bit, quantize_4bit
from . import nn
from .nn import Linear4bit, quantize_model
from .adapters import load_adapter, save_adapter
from . import io
from . import distributed
from .io import load_pretrained_4bit, load_quantized, save_quantized
from .graph_step import CUDAGraphStep

__version__ = "0.1.0"

_PLANNER_NAMES = ("MemoryPlan", "max_seq_len", "plan_memory")


def __getattr__(name):
    # The planner loads on first use, so that `python -m lowbit.planner` runs
    # the module once rather than after an import of it.
    if name == "planner" or name in _PLANNER_NAMES:
        import importlib

        planner = importlib.import_module(".planner", __name__)
        return planner if name == "planner" else getattr(planner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CUDAGraphStep",
    "Linear4bit",
    "MemoryPlan",
    "QuantState",
    "cuda_available",
    "dequantize_4bit",
    "distributed",
    "functional",
    "info",
    "io",
    "load_adapter",
    "load_pretrained_4bit",
    "load_quantized",
    "max_seq_len",
    "nn",
    "ops",
    "optim",
    "plan_memory",
    "planner",
    "quantize_4bit",
    "quantize_model",
    "save_adapter",
    "save_quantized",
]

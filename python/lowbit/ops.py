"""Typed wrappers over torch.ops.lowbit and the fake (meta) kernels that let
the ops run under FakeTensor, torch.compile and torch.export.

The schemas live in C++ (csrc/registration.cpp); this file adds only what the
Python side must: shape functions and autograd formulas.
"""
from typing import Optional, Sequence

import torch

_lib = torch.ops.lowbit


def _nblocks(n, blocksize):
    return -(-n // blocksize)


def _is_meta(t) -> bool:
    return t.device.type == "meta"


def _check_not_mixed_meta(op: str, ref_name: str, ref: torch.Tensor, *named) -> None:
    """Refuses a call that mixes meta tensors with tensors on a real device.

    Such a call dispatches to the fake kernel below (the Meta key wins over
    CPU/CUDA), which would hand back uninitialised memory, or for an in-place
    op do nothing, instead of the error the CPU/CUDA kernels raise for
    arguments on different devices. Only the meta/non-meta mix is refused:
    all-meta calls are shape propagation, and under FakeTensorMode (the
    torch.compile/export tracers) fake tensors report their real device.
    `named` holds (name, tensor-or-None) pairs, each checked against `ref`.
    """
    ref_meta = _is_meta(ref)
    for name, t in named:
        if t is not None and _is_meta(t) != ref_meta:
            raise ValueError(
                f"lowbit.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                "move both to the same device"
            )


def _weight_args(code, absmax, nested_absmax, nested_code, offset):
    return (("code", code), ("absmax", absmax), ("nested_absmax", nested_absmax), ("nested_code", nested_code),
            ("offset", offset))


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake("lowbit::quantize_4bit")
def _(A, blocksize, quant_type):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lowbit::dequantize_4bit")
def _(packed, absmax, code, blocksize, shape, dtype, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256):
    _check_not_mixed_meta("dequantize_4bit", "packed", packed,
                          *_weight_args(code, absmax, nested_absmax, nested_code, offset))
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("lowbit::quantize_8bit_blockwise")
def _(A, code, blocksize):
    _check_not_mixed_meta("quantize_8bit_blockwise", "A", A, ("code", code))
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((_nblocks(A.numel(), blocksize),), dtype=torch.float32)


@torch.library.register_fake("lowbit::dequantize_8bit_blockwise")
def _(A, absmax, code, blocksize, dtype):
    _check_not_mixed_meta("dequantize_8bit_blockwise", "A", A, ("code", code), ("absmax", absmax))
    return A.new_empty(A.shape, dtype=dtype)


# ---------------------------------------------------------------- wrappers


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Packed uint8 codes [(n+1)//2, 1] and float32 absmax per block."""
    return _lib.quantize_4bit(A, blocksize, quant_type)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    return _lib.dequantize_4bit(
        packed, absmax, code, blocksize, list(shape), dtype, nested_absmax, nested_code, offset, nested_blocksize
    )


def quantize_8bit_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    return _lib.quantize_8bit_blockwise(A, code, blocksize)


def dequantize_8bit_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return _lib.dequantize_8bit_blockwise(A, absmax, code, blocksize, dtype)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry 8-bit dynamic map (float32, CPU), as bitsandbytes builds it."""
    return _lib.dynamic_map(signed)


# ---------------------------------------------------------------- gemm: 4-bit weight matmul


@torch.library.register_fake("lowbit::gemm_4bit")
def _(x, packed, absmax, code, blocksize, N, K, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, bias=None):
    _check_not_mixed_meta("gemm_4bit", "x", x, ("packed", packed), ("bias", bias))
    _check_not_mixed_meta("gemm_4bit", "packed", packed,
                          *_weight_args(code, absmax, nested_absmax, nested_code, offset))
    torch._check(x.shape[-1] == K, lambda: f"lowbit.gemm_4bit: x.shape[-1] must be K = {K}, got {x.shape[-1]}")
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("lowbit::gemm_4bit_t")
def _(g, packed, absmax, code, blocksize, N, K, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256):
    _check_not_mixed_meta("gemm_4bit_t", "g", g, ("packed", packed))
    _check_not_mixed_meta("gemm_4bit_t", "packed", packed,
                          *_weight_args(code, absmax, nested_absmax, nested_code, offset))
    torch._check(g.shape[-1] == N, lambda: f"lowbit.gemm_4bit_t: g.shape[-1] must be N = {N}, got {g.shape[-1]}")
    return g.new_empty((*g.shape[:-1], K))


_FROZEN_ARGS = {2: "absmax", 3: "code", 7: "nested_absmax", 8: "nested_code", 9: "offset"}


def _gemm_4bit_setup_context(ctx, inputs, output):
    x, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, nested_blocksize, bias = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
    ctx.weight_meta = (blocksize, N, K, nested_blocksize)
    ctx.has_bias = bias is not None


def _needs_grad(ctx, i):
    # Traced backward passes may hand a shorter tuple (trailing defaults dropped).
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _gemm_4bit_backward(ctx, grad_out):
    for i, name in _FROZEN_ARGS.items():
        if _needs_grad(ctx, i):
            raise RuntimeError(
                f"lowbit.gemm_4bit: the 4-bit weight is frozen: no gradient flows to its '{name}' "
                "(call .requires_grad_(False) on it, or train a LoRA adapter beside the frozen weight)"
            )
    packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, N, K, nested_blocksize = ctx.weight_meta
    grad_x = grad_bias = None
    if _needs_grad(ctx, 0):
        grad_x = _lib.gemm_4bit_t(grad_out, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code,
                                  offset, nested_blocksize)
    if ctx.has_bias and _needs_grad(ctx, 11):
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("lowbit::gemm_4bit", _gemm_4bit_backward, setup_context=_gemm_4bit_setup_context)


def gemm_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    N: int,
    K: int,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x[..., K] @ dequant(W)[N, K]^T (+ bias), in x's dtype; differentiable in x and bias."""
    return _lib.gemm_4bit(x, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset,
                          nested_blocksize, bias)


def gemm_4bit_t(
    g: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    N: int,
    K: int,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """g[..., N] @ dequant(W)[N, K], in g's dtype (the gradient of gemm_4bit in x)."""
    return _lib.gemm_4bit_t(g, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset,
                            nested_blocksize)

# ---------------------------------------------------------------- optim/


@torch.library.register_fake("lowbit::adamw8bit_step")
def _(params, grads, state1, state2, absmax1, absmax2, steps, lr, code1, code2, beta1, beta2, eps, weight_decay,
      blocksize=256, increment_steps=False, index_base=0):
    # The step is in place: a fake kernel that returns quietly on a mixed
    # meta/real call would skip the update, so refuse it as the real kernel
    # refuses arguments on different devices. lr may stay on the CPU.
    op = "adamw8bit_step"
    _check_not_mixed_meta(op, "code1", code1, ("code2", code2), *(
        (f"params[{i}]", p) for i, p in enumerate(params)))
    for name, ts in (("grads", grads), ("state1", state1), ("state2", state2), ("absmax1", absmax1),
                     ("absmax2", absmax2), ("steps", steps)):
        for i, (p, t) in enumerate(zip(params, ts)):
            # float32 states carry empty absmax tensors, which may live anywhere
            if name.startswith("absmax") and _is_meta(t) != _is_meta(p) and t.numel() == 0:
                continue
            _check_not_mixed_meta(op, f"params[{i}]", p, (f"{name}[{i}]", t))
    if params and lr.device.type != "cpu":
        _check_not_mixed_meta(op, "params[0]", params[0], ("lr", lr))
    return None


@torch.library.register_fake("lowbit::alloc_managed")
def _(nbytes, device):
    return torch.empty((nbytes,), dtype=torch.uint8, device=device)


@torch.library.register_fake("lowbit::is_managed")
def _(t):
    # Fake tensors own no memory, managed or otherwise.
    return False


@torch.library.register_fake("lowbit::prefetch_managed")
def _(tensors):
    return None


def adamw8bit_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state1: Sequence[torch.Tensor],
    state2: Sequence[torch.Tensor],
    absmax1: Sequence[torch.Tensor],
    absmax2: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    blocksize: int = 256,
    increment_steps: bool = False,
    index_base: int = 0,
) -> None:
    """One AdamW step in place for a list of parameters (see csrc/core/adamw8bit.h for the math).

    steps[i] holds the step count including this step; with increment_steps
    the op first adds 1 to each of them itself. index_base numbers the
    parameters in error messages (params[index_base + i]).
    """
    _lib.adamw8bit_step(
        list(params), list(grads), list(state1), list(state2), list(absmax1), list(absmax2), list(steps), lr, code1,
        code2, float(beta1), float(beta2), float(eps), float(weight_decay), blocksize, bool(increment_steps),
        int(index_base),
    )


def alloc_managed(nbytes: int, device) -> torch.Tensor:
    """uint8 [nbytes] in CUDA managed memory, freed with the tensor."""
    return _lib.alloc_managed(nbytes, torch.device(device))


def is_managed(t: torch.Tensor) -> bool:
    return _lib.is_managed(t)


def prefetch_managed(tensors: Sequence[torch.Tensor]) -> None:
    _lib.prefetch_managed(list(tensors))


def managed_bytes() -> int:
    """Bytes of managed memory lowbit has allocated and not yet freed (all devices)."""
    return _lib.managed_bytes()

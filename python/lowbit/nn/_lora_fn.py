"""One autograd node for a Linear4bit call: the 4-bit base matmul, the bias
and the LoRA branch (with its dropout) forward and backward together.

The composite form (gemm_4bit op + dropout + linear + addmm + dtype casts)
records about eight autograd nodes per layer call, each with its own Python
and dispatcher cost; a 7B model makes 224 such calls per forward, twice with
gradient checkpointing, and at short sequences that host time, not the GPU,
sets the step time. This node does the same arithmetic with the same
kernels (the base matmul and its transposed backward, cuBLAS for the
adapters) and saves the same tensors (the dropped-out input, the dropout mask,
x A^T and the 16-bit copies of A and B), so the memory a checkpointed layer
holds is unchanged.

Gradients (s = alpha / r, h = dropout(x) = x * mask / (1 - p), u = h A^T):
    out     = x W^T + bias + s * u B^T
    dB      = s * g^T u
    dA      = s * (g B)^T h
    dx      = g W + s * ((g B) A) * mask / (1 - p)
    dbias   = sum of g over rows
The adapter gradients come back in the adapters' own dtype (float32), as
autograd's cast nodes would give them.
"""
from __future__ import annotations

from typing import Optional

import torch

_lib = torch.ops.lowbit


class Lora4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, bias, packed, absmax, code, nested_absmax, nested_code, offset,
                meta, scaling: float, p: float):
        blocksize, N, K, nested_blocksize = meta
        if bias is not None:
            bias = bias.to(x.dtype)
        # Straight to the CUDA/CPU kernel: this node is the autograd of the
        # call, and the op's own (Python) autograd wrapper would cost more
        # host time than the kernel launch.
        with torch._C._AutoDispatchBelowAutograd():
            out = _lib.gemm_4bit(x, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset,
                                 nested_blocksize, bias)
        mask = None
        if A is not None:
            a = A.to(x.dtype)
            b = B.to(x.dtype)
            if p > 0.0:
                h, mask = torch.native_dropout(x, p, True)
            else:
                h = x
            u = torch.mm(h, a.t())
            out = torch.addmm(out, u, b.t(), alpha=scaling)
            ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset, h, mask, u, a, b)
        else:
            ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
        ctx.meta = meta
        ctx.scaling = scaling
        ctx.p = p
        ctx.has_lora = A is not None
        ctx.adapter_dtypes = (A.dtype, B.dtype) if A is not None else None
        return out

    @staticmethod
    def backward(ctx, g):
        blocksize, N, K, nested_blocksize = ctx.meta
        saved = ctx.saved_tensors
        packed, absmax, code, nested_absmax, nested_code, offset = saved[:6]
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        for i, name in ((4, "weight"), (5, "absmax"), (6, "code"), (7, "nested_absmax"), (8, "nested_code"),
                        (9, "offset")):
            if ctx.needs_input_grad[i]:
                raise RuntimeError(f"lowbit.Linear4bit: the 4-bit weight is frozen: no gradient flows to its "
                                   f"'{name}' (train the LoRA adapters beside it)")
        g = g.contiguous()
        gx = ga = gb = gbias = None
        if need_x:
            gx = _lib.gemm_4bit_t(g, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset,
                                  nested_blocksize)
        if ctx.has_lora:
            h, mask, u, a, b = saved[6:]
            s = ctx.scaling
            # s folded into the small [T, r] factor once: g B s
            gBs = torch.mm(g, b).mul_(s) if (need_x or need_a) else None
            if need_b:
                gb = torch.mm(g.t(), u).mul_(s).to(ctx.adapter_dtypes[1])
            if need_a:
                ga = torch.mm(gBs.t(), h).to(ctx.adapter_dtypes[0])
            if need_x:
                if mask is None:
                    gx.addmm_(gBs, a)
                else:
                    gh = torch.mm(gBs, a)
                    gx.add_(torch.ops.aten.native_dropout_backward(gh, mask, 1.0 / (1.0 - ctx.p)))
        if need_bias:
            gbias = g.sum(0)
        return gx, ga, gb, gbias, None, None, None, None, None, None, None, None, None


def lora_4bit(x: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              packed: torch.Tensor, state, scaling: float, p: float) -> torch.Tensor:
    """x [T, K] (compute dtype, contiguous) -> [T, N] through Lora4bitFunction."""
    N, K = state.shape
    meta = (state.blocksize, N, K, state.nested_blocksize)
    return Lora4bitFunction.apply(x, A, B, bias, packed, state.absmax, state.code, state.nested_absmax,
                                  state.nested_code, state.offset, meta, scaling, p)

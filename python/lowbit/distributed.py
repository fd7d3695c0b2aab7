"""Helpers for running lowbit models under torch.distributed (DDP, FSDP2)."""
from __future__ import annotations

import hashlib
from typing import List, Optional

import torch
import torch.nn as nn

from .nn.linear4bit import Linear4bit

_CHUNK = 1 << 24
_MOD = 65521  # Fletcher/Adler modulus: position weights stay small, the int64 sums cannot overflow


def _digest(t: Optional[torch.Tensor]) -> str:
    """A cheap on-device checksum of a tensor's bytes (order-sensitive), one host sync."""
    if t is None:
        return "-"
    b = t.detach().reshape(-1).contiguous().view(torch.uint8)
    s1 = torch.zeros((), dtype=torch.int64, device=b.device)
    s2 = torch.zeros((), dtype=torch.int64, device=b.device)
    for start in range(0, b.numel(), _CHUNK):
        c = b[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + c.numel(), dtype=torch.int64, device=b.device) % _MOD + 1
        s1 += c.sum()
        s2 += (c * pos).sum()
    return f"{b.numel()}:{int(s1)}:{int(s2)}"


def fingerprint(model: nn.Module) -> List[str]:
    """One line per Linear4bit layer and per parameter: what must agree across ranks.

    Layers: name, shape, quant type, block size, double quantization, LoRA r and
    alpha, compute dtype, and a checksum of the quant state's tensors (absmax,
    offset, nested absmax). Parameters: name, shape, dtype, requires_grad.

    The quant state is checksummed because DDP's start-up broadcast (and FSDP's
    sharding) covers parameters and buffers only: a rank whose base weights
    differ would get rank 0's packed codes but keep its own scales, a silently
    wrong model. The packed weight and the LoRA tensors are not checksummed:
    DDP overwrites them with rank 0's, which is the usual way to start ranks from
    the same adapters. The quant state is 1/32 of the packed weight's size.
    """
    lines = []
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            st = m.quant_state
            lines.append(
                f"layer {name or '<root>'}: shape={list(st.shape)} quant_type={st.quant_type} "
                f"blocksize={st.blocksize} double_quant={st.nested} r={m.r} "
                f"lora_alpha={getattr(m, 'lora_alpha', None)} compute_dtype={m.compute_dtype} "
                f"quant_state=[absmax {_digest(st.absmax)}, offset {_digest(st.offset)}, "
                f"nested_absmax {_digest(st.nested_absmax)}]"
            )
    for name, p in model.named_parameters():
        lines.append(f"param {name}: shape={list(p.shape)} dtype={p.dtype} requires_grad={p.requires_grad}")
    return lines


def check_consistent(model: nn.Module, group=None) -> None:
    """Checks that every rank of `group` holds the same lowbit model; call it
    before wrapping with DistributedDataParallel or fully_shard.

    A collective: every rank of the group must call it. Ranks exchange a hash of
    `fingerprint(model)` first and the full fingerprints only when the hashes
    differ; then every rank raises the same ValueError naming the first
    difference, instead of DDP hanging or training a mixed model."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lowbit.distributed.check_consistent: torch.distributed is not initialized")
    world = dist.get_world_size(group)
    lines = fingerprint(model)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    everyone = [None] * world
    dist.all_gather_object(everyone, lines, group=group)
    ref = everyone[0]
    for rank in range(1, world):
        other = everyone[rank]
        if other == ref:
            continue
        for i in range(max(len(ref), len(other))):
            a = ref[i] if i < len(ref) else "<nothing>"
            b = other[i] if i < len(other) else "<nothing>"
            if a != b:
                w = len(f"rank {rank}:")
                raise ValueError(
                    f"lowbit.distributed.check_consistent: rank {rank} differs from rank 0 "
                    f"(were all ranks converted with the same quantize_model arguments from the same "
                    f"weights?):\n  {'rank 0:':<{w}} {a}\n  {f'rank {rank}:':<{w}} {b}"
                )
    raise ValueError("lowbit.distributed.check_consistent: ranks' fingerprints differ")  # unreachable

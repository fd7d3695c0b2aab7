"""Helpers for running lowbit models under torch.distributed (DDP, FSDP2).

FSDP2 with sharded 4-bit weights:

    lowbit.quantize_model(model, lora_r=16)          # on every rank, same arguments
    lowbit.distributed.shard_model(model)            # fully_shard per decoder layer, then the root
    opt = lowbit.optim.PagedAdamW8bit(p for p in model.parameters() if p.requires_grad)
    ...train...
    sd = lowbit.distributed.full_state_dict(model)   # rank 0: the single-GPU (bitsandbytes) layout

shard_model turns each Linear4bit weight into a Packed4bitWeight (records of
codes and scales, lowbit/nn/packed_weight.py), which fully_shard splits on
dim 0 like any parameter; each rank keeps 1/world of the records and FSDP2
all-gathers them as uint8 just before the layer runs.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .nn.linear4bit import Linear4bit
from .nn.packed_weight import Packed4bitWeight, is_sharded, packed_local

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
        if isinstance(m, Linear4bit) and m.is_packed:
            # Packed (and maybe sharded): the layout, and the one replicated scale.
            local = packed_local(m.weight)
            offset = local._tables.cpu[2]
            lines.append(
                f"layer {name or '<root>'}: packed {local.record_layout.describe()} r={m.r} "
                f"lora_alpha={getattr(m, 'lora_alpha', None)} compute_dtype={m.compute_dtype} "
                f"offset {_digest(offset)}"
            )
        elif isinstance(m, Linear4bit):
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


# ---------------------------------------------------------------- FSDP2


def _default_mesh(model: nn.Module):
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed as dist

    dev = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return init_device_mesh(dev.type, (dist.get_world_size(),))


def _shard_units(model: nn.Module) -> List[nn.Module]:
    """The blocks to wrap one by one: the children of the longest ModuleList or
    Sequential holding Linear4bit layers (a transformer's decoder layers), else
    every Linear4bit on its own."""
    best: List[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            kids = [c for c in m.children() if any(isinstance(x, Linear4bit) for x in c.modules())]
            if len(kids) > len(best) and not any(isinstance(c, Linear4bit) for c in kids):
                best = kids
    return best or [m for m in model.modules() if isinstance(m, Linear4bit)]


def shard_model(
    model: nn.Module,
    mesh=None,
    reshard_after_forward: Optional[bool] = None,
    cpu_offload: bool = False,
    *,
    units: Optional[Iterable[nn.Module]] = None,
    mp_policy=None,
    check: bool = True,
) -> nn.Module:
    """Applies FSDP2 (fully_shard) to a model converted with lowbit.quantize_model,
    sharding its 4-bit weights too. A collective: every rank calls it, with the same model.

    Each Linear4bit weight becomes a Packed4bitWeight (same bytes, cut into
    records aligned with the quantization and nested blocks), so every rank keeps
    about 1/world of the packed codes and of their scales, and a layer's weight is
    all-gathered as uint8 just before it runs and freed after. reshard_after_forward
    None (FSDP2's default) frees each unit's weights after its forward and gathers
    them again for backward, but keeps the root's (embeddings, head, ...) from the
    forward on, since backward needs them at once: one all-gather of them per step
    instead of two. True or False applies to every unit and the root.
    LoRA adapters and biases are sharded the usual FSDP2 way (DTensor shards;
    lowbit.optim.AdamW8bit / PagedAdamW8bit step on the local shards).

    fully_shard is applied to each of `units` (default: the decoder layers, the
    children of the longest ModuleList/Sequential holding Linear4bit layers; else
    each Linear4bit), then to `model`. `mesh`: a 1-D DeviceMesh (default: all ranks,
    on the model's device type). cpu_offload keeps the shards and the optimizer's
    work on the CPU (FSDP2's CPUOffloadPolicy). With `check`, check_consistent runs
    first, so ranks that converted the model differently all raise the same error.
    Returns `model` (now an FSDPModule).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lowbit.distributed.shard_model: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("lowbit.distributed.shard_model: the model has no Linear4bit layers; convert it with "
                         "lowbit.quantize_model(model, ...) (on every rank, with the same arguments) before sharding")
    if any(is_sharded(m.weight) for m in layers):
        raise ValueError("lowbit.distributed.shard_model: the model is already sharded")
    if mesh is None:
        mesh = _default_mesh(model)
    if mesh.ndim != 1:
        raise ValueError(f"lowbit.distributed.shard_model: needs a 1-D device mesh, got {mesh.ndim}-D")
    if check:
        check_consistent(model, mesh.get_group())
    for m in layers:
        m.pack_for_sharding()
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
              mp_policy=mp_policy or MixedPrecisionPolicy())
    if cpu_offload:
        # Pinned host memory lets the host-to-device copies of the shards run
        # asynchronously; pinning needs a CUDA driver, and on a CPU mesh the
        # "offloaded" shards are where they already were.
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    for unit in (list(units) if units is not None else _shard_units(model)):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def _comm_device(mesh) -> torch.device:
    """The device the collectives of `mesh` take tensors on. FSDP2's CPU
    offload keeps the shards in host memory even on a GPU mesh, so they are
    copied there before a gather."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def _gather_rows(local: torch.Tensor, rows: int, mesh) -> torch.Tensor:
    """The whole tensor of `rows` rows from each rank's dim-0 chunk (torch.chunk
    layout, as fully_shard splits: ceil(rows/world) rows per rank, the last
    ranks short or empty), on the mesh's device."""
    import torch.distributed as dist

    world = mesh.size()
    per = -(-rows // world)
    dev = _comm_device(mesh)
    send = torch.zeros((per,) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
    send[: local.shape[0]].copy_(local)
    out = torch.empty((per * world,) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
    dist.all_gather_into_tensor(out, send, group=mesh.get_group())
    return out[:rows]


def _gather_packed(param) -> Packed4bitWeight:
    """All records of a sharded Packed4bitWeight parameter, on every rank."""
    local = packed_local(param)
    out = _gather_rows(local.records(), local.record_layout.num_records, param.device_mesh)
    return local._like(records=out)


def _full_tensor(v) -> torch.Tensor:
    """DTensor.full_tensor(), also for a shard FSDP2 offloaded to the host on a GPU mesh."""
    from torch.distributed.tensor import Shard

    mesh = v.device_mesh
    local = v.to_local()
    if local.device.type == mesh.device_type:
        return v.full_tensor()
    if mesh.ndim != 1 or tuple(v.placements) != (Shard(0),):
        raise ValueError(f"lowbit.distributed.full_state_dict: an offloaded parameter with placements "
                         f"{tuple(v.placements)} on a {mesh.ndim}-D mesh; only Shard(0) on a 1-D mesh "
                         f"(what shard_model applies) is supported")
    return _gather_rows(local, v.shape[0], mesh)


def full_state_dict(model: nn.Module, rank0_only: bool = True, cpu: bool = True) -> Dict[str, torch.Tensor]:
    """The whole model's state dict from an FSDP2-sharded model, in exactly the
    layout (keys, order, dtypes, bytes) the unsharded model's state_dict() gives:
    4-bit weights in the bitsandbytes layout, LoRA and other parameters whole.

    A collective: every rank calls it. With rank0_only the other ranks return an
    empty dict (they still take part in the gathers); with `cpu` the tensors are
    moved to the CPU one at a time."""
    import torch.distributed as dist

    rank = dist.get_rank()
    keep = rank == 0 or not rank0_only
    owners = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit) and is_sharded(m._parameters["weight"]):
            owners[(name + "." if name else "") + "weight"] = (name + "." if name else "")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    pending: List[tuple] = []  # (module prefix, quant-state entries) to place after that module's own tensors

    def flush(next_key=None):
        while pending and (next_key is None or not next_key.startswith(pending[0][0])
                           or "." in next_key[len(pending[0][0]):]):
            for k, v in pending.pop(0)[1].items():
                if keep:
                    out[k] = v.cpu() if cpu else v

    for k, v in model.state_dict().items():
        flush(k)
        if k in owners:
            packed, state = _gather_packed(v).unpacked()
            if keep:
                out[k] = packed.cpu() if cpu else packed
            pending.append((owners[k], state.to_state_dict(k + ".")))
            continue
        if hasattr(v, "full_tensor"):
            v = _full_tensor(v)
        if keep:
            out[k] = v.detach().cpu() if cpu else v.detach()
    flush()
    return out


def load_full_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Loads a whole (unsharded, bitsandbytes-layout) state dict, such as
    full_state_dict() or a single-GPU state_dict() writes, into an FSDP2-sharded
    model: each rank keeps its own share. Works for any world size. Every rank
    calls it with the same dict. Returns load_state_dict's (missing, unexpected) keys."""
    from torch.distributed.tensor.experimental import implicit_replication

    # Whole tensors given for DTensor parameters are taken as replicated, so
    # each rank copies its own shard of them (no communication).
    with implicit_replication():
        return model.load_state_dict(state_dict, strict=strict)

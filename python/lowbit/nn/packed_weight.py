"""Packed4bitWeight: a Linear4bit weight that FSDP2 (fully_shard) can shard.

The 4-bit codes and their scales are cut into *records*: record u holds the
packed codes of `S` consecutive weights (S = blocksize * nested_blocksize with
double quantization, else one quantization block), followed by the absmax
bytes of those blocks and, with double quantization, the one float32 nested
absmax that scales them:

    record u = [ S/2 code bytes | absmax bytes of its blocks | 4 bytes nested_absmax ]

so one record is self-contained and a record boundary is always a boundary of
the quantization blocks and of the nested blocks. The records form a uint8
tensor [U, B] (U = ceil(N*K / S), B bytes per record; the tail of the last
record is zero padding). FSDP2 shards dim 0: each rank stores ceil(U/world)
records, all-gathers them as uint8 before the layer runs (about 4.13 bits per
weight on the wire instead of 16), and this class turns the gathered records
back into the contiguous packed codes and scales the 4-bit kernels read.

The wrapper tensor presents itself as a [U, B] tensor of the weight's original
floating dtype: FSDP2 re-wraps every sharded parameter as an nn.Parameter, and
only floating tensors may be Parameters. Its data is never read as floats; any
op other than the few FSDP2 uses to shard, move and copy it raises.

Two forms share the class:
  records form: inner tensor `_records` uint8 [rows, B] (all records, or this
      rank's shard of them); the form FSDP2 shards, pads and all-gathers.
  gathered form: inner tensors `_codes` [(N*K+1)//2, 1], `_absmax`, and
      `_nested_absmax`: what fsdp_post_all_gather rebuilds and the forward pass
      uses; the same tensor objects are refilled in place on every all-gather,
      so autograd's saved references stay valid after FSDP frees and re-gathers.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from .. import functional as F

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Geometry of the records of one [N, K] weight (see the module docstring)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested: bool
    nested_blocksize: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def code_nbytes(self) -> int:  # packed codes of the whole weight
        return (self.numel + 1) // 2

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def blocks_per_record(self) -> int:
        return self.nested_blocksize if self.nested else 1

    @property
    def elems_per_record(self) -> int:
        return self.blocksize * self.blocks_per_record

    @property
    def code_bytes(self) -> int:  # per record
        return self.elems_per_record // 2

    @property
    def absmax_bytes(self) -> int:  # per record: uint8 codes with double quant, else float32
        return self.blocks_per_record * (1 if self.nested else 4)

    @property
    def nested_bytes(self) -> int:  # per record
        return 4 if self.nested else 0

    @property
    def record_bytes(self) -> int:
        return self.code_bytes + self.absmax_bytes + self.nested_bytes

    @property
    def num_records(self) -> int:
        return -(-self.numel // self.elems_per_record)

    def describe(self) -> str:
        return (f"shape={list(self.shape)} dtype={self.dtype} quant_type={self.quant_type} "
                f"blocksize={self.blocksize} double_quant={self.nested} records={self.num_records}x{self.record_bytes}")


class _Tables:
    """The replicated, read-only part of a quant state: the 4-bit code book, the
    nested map and the nested offset. Tiny, so every rank keeps all of it, one
    copy per device it was asked for."""

    def __init__(self, code: torch.Tensor, nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor]):
        self._by_device: Dict[torch.device, tuple] = {}
        self._by_device[code.device] = (code, nested_code, offset)
        self.cpu = tuple(None if t is None else t.detach().cpu() for t in (code, nested_code, offset))

    def on(self, device: torch.device) -> tuple:
        device = torch.device(device)
        got = self._by_device.get(device)
        if got is None:
            got = tuple(None if t is None else t.to(device) for t in self.cpu)
            self._by_device[device] = got
        return got


def _put(cols: torch.Tensor, flat: torch.Tensor) -> None:
    """Writes the 1-D byte tensor `flat` row-major into the [rows, w] view `cols`."""
    w = cols.shape[1]
    n = flat.numel()
    full = n // w
    if full:
        cols[:full].copy_(flat[: full * w].view(full, w))
    if n - full * w:
        cols[full, : n - full * w].copy_(flat[full * w:])


def _take(flat: torch.Tensor, cols: torch.Tensor) -> None:
    """The inverse of _put: fills the 1-D byte tensor `flat` from the [rows, w] view `cols`."""
    w = cols.shape[1]
    n = flat.numel()
    full = n // w
    if full:
        flat[: full * w].view(full, w).copy_(cols[:full])
    if n - full * w:
        flat[full * w:].copy_(cols[full, : n - full * w])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _pack_records(packed: torch.Tensor, state: F.QuantState, layout: RecordLayout) -> torch.Tensor:
    rec = torch.zeros(layout.num_records, layout.record_bytes, dtype=torch.uint8, device=packed.device)
    c, a = layout.code_bytes, layout.absmax_bytes
    _put(rec[:, :c], packed.reshape(-1))
    _put(rec[:, c:c + a], _bytes(state.absmax.contiguous()))
    if layout.nested:
        _put(rec[:, c + a:], _bytes(state.nested_absmax.contiguous()))
    return rec


def _alloc_parts(layout: RecordLayout, device) -> List[torch.Tensor]:
    parts = [
        torch.empty(layout.code_nbytes, 1, dtype=torch.uint8, device=device),
        torch.empty(layout.nblocks, dtype=torch.uint8 if layout.nested else torch.float32, device=device),
    ]
    if layout.nested:
        parts.append(torch.empty(layout.num_records, dtype=torch.float32, device=device))
    return parts


def _unpack_records(rec: torch.Tensor, parts: List[torch.Tensor], layout: RecordLayout) -> None:
    """Fills the gathered-form tensors from all U records (padding rows already stripped)."""
    c, a = layout.code_bytes, layout.absmax_bytes
    _take(parts[0].view(-1), rec[:, :c])
    _take(_bytes(parts[1]), rec[:, c:c + a])
    if layout.nested:
        _take(_bytes(parts[2]), rec[:, c + a:])


def _dim0(t: "Packed4bitWeight", dim: int, op) -> None:
    if t._records is None or t.dim() != 2 or dim not in (0, -2):
        raise NotImplementedError(
            f"Packed4bitWeight: {op} is supported along dim 0 of the [records, bytes] form only (got dim={dim}, "
            f"shape={list(t.shape)})")


class Packed4bitWeight(torch.Tensor):
    """A frozen 4-bit weight laid out as shardable records (module docstring)."""

    _records: Optional[torch.Tensor]
    _codes: Optional[torch.Tensor]
    _absmax: Optional[torch.Tensor]
    _nested_absmax: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, records, layout: RecordLayout, tables: _Tables, dtype=None, parts=None, shape=None):
        ref = records if records is not None else parts[0]
        if shape is None:
            rows = records.shape[0] if records is not None else layout.num_records
            shape = (rows, layout.record_bytes)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or layout.dtype, device=ref.device,
                                                   requires_grad=False)

    def __init__(self, records, layout: RecordLayout, tables: _Tables, dtype=None, parts=None, shape=None):
        self._records = records
        self.record_layout = layout
        self._tables = tables
        if parts is not None:
            self._codes, self._absmax = parts[0], parts[1]
            self._nested_absmax = parts[2] if len(parts) > 2 else None
        else:
            self._codes = self._absmax = self._nested_absmax = None

    # ------------------------------------------------------------ building and reading

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: F.QuantState) -> "Packed4bitWeight":
        """All records of a packed weight and its QuantState (a copy; the inputs are not kept)."""
        if len(state.shape) != 2:
            raise ValueError(f"Packed4bitWeight: the weight must be 2-D [out, in], got shape {list(state.shape)}")
        state.validate(packed, where="Packed4bitWeight")
        layout = RecordLayout(tuple(state.shape), state.dtype, state.quant_type, state.blocksize, state.nested,
                              state.nested_blocksize)
        tables = _Tables(state.code, state.nested_code, state.offset)
        with torch.no_grad():
            rec = _pack_records(packed.detach(), state, layout)
        return cls(rec, layout, tables)

    @property
    def is_gathered(self) -> bool:
        return self._records is None

    @property
    def is_complete(self) -> bool:
        """True when this tensor holds every record of the weight (not a shard)."""
        return self._records is None or self._records.shape[0] == self.record_layout.num_records

    def _parts(self) -> List[torch.Tensor]:
        ps = [self._codes, self._absmax]
        if self._nested_absmax is not None:
            ps.append(self._nested_absmax)
        return ps

    def _state_from_parts(self, parts: List[torch.Tensor]) -> Tuple[torch.Tensor, F.QuantState]:
        L = self.record_layout
        code, nested_code, offset = self._tables.on(parts[0].device)
        state = F.QuantState(absmax=parts[1], shape=torch.Size(L.shape), dtype=L.dtype, blocksize=L.blocksize,
                             quant_type=L.quant_type, code=code, offset=offset if L.nested else None,
                             nested_absmax=parts[2] if L.nested else None,
                             nested_code=nested_code if L.nested else None, nested_blocksize=L.nested_blocksize)
        return parts[0], state

    def unpacked(self) -> Tuple[torch.Tensor, F.QuantState]:
        """(packed uint8 [(N*K+1)//2, 1], QuantState): the single-GPU layout, bytes identical.

        The gathered form returns its own tensors (no copy); the complete records
        form unpacks into new tensors; a shard raises."""
        if self._records is None:
            return self._state_from_parts(self._parts())
        if not self.is_complete:
            raise RuntimeError(
                f"Packed4bitWeight: this tensor is one shard ({self._records.shape[0]} of {self.record_layout.num_records} "
                f"records) of a weight sharded by FSDP; the whole weight exists only while the layer runs. Gather it "
                f"with lowbit.distributed.full_state_dict(model).")
        parts = _alloc_parts(self.record_layout, self._records.device)
        with torch.no_grad():
            _unpack_records(self._records, parts, self.record_layout)
        return self._state_from_parts(parts)

    def records(self) -> torch.Tensor:
        if self._records is None:
            raise RuntimeError("Packed4bitWeight: the gathered form holds no records")
        return self._records

    def __repr__(self, *, tensor_contents=None):
        form = "gathered" if self._records is None else f"records={self._records.shape[0]}"
        return f"Packed4bitWeight({self.record_layout.describe()}, {form}, device={self.device})"

    # ------------------------------------------------------------ subclass protocol

    def __tensor_flatten__(self):
        names = ["_records"] if self._records is not None else [
            n for n in ("_codes", "_absmax", "_nested_absmax") if getattr(self, n) is not None]
        return names, (self.record_layout, self._tables, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        layout, tables, dtype = ctx
        if "_records" in inner:
            return Packed4bitWeight(inner["_records"], layout, tables, dtype=dtype, shape=tuple(outer_size))
        parts = [inner["_codes"], inner["_absmax"]] + ([inner["_nested_absmax"]] if "_nested_absmax" in inner else [])
        return Packed4bitWeight(None, layout, tables, dtype=dtype, parts=parts, shape=tuple(outer_size))

    def __reduce_ex__(self, proto):
        inner = self._records if self._records is not None else tuple(self._parts())
        return _rebuild, (inner, self.record_layout, self._tables.cpu, self.dtype, tuple(self.shape))

    def _like(self, records=None, parts=None, dtype=None, shape=None) -> "Packed4bitWeight":
        return Packed4bitWeight(records, self.record_layout, self._tables, dtype=dtype or self.dtype, parts=parts,
                                shape=shape)

    def _map_inner(self, fn, dtype=None) -> "Packed4bitWeight":
        if self._records is not None:
            return self._like(records=fn(self._records), dtype=dtype, shape=tuple(self.shape))
        return self._like(parts=[fn(p) for p in self._parts()], dtype=dtype, shape=tuple(self.shape))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Packed4bitWeight does not support {func}: it holds a frozen 4-bit weight as shardable records and "
                f"implements only the ops FSDP2 uses to shard, move and copy it. Compute with the owning "
                f"Linear4bit, or take .unpacked() / Linear4bit.dequantized_weight().")
        return handler(*args, **kwargs)

    # ------------------------------------------------------------ FSDP2 all-gather extension

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # FSDP2 shards dim 0 as torch.chunk does: ceil(U / world) records per
        # rank, the last ranks short or empty. Every rank must hand the
        # collective the same size, so a short shard is padded with zero
        # records (fsdp_post_all_gather strips them again).
        rec = self.records()
        rows = -(-int(outer_size[0]) // mesh.size())
        if rec.shape[0] != rows:
            padded = rec.new_zeros(rows, rec.shape[1])
            padded[: rec.shape[0]].copy_(rec)
            rec = padded
        return (rec,), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        rec = gathered.view(-1, self.record_layout.record_bytes)[: self.record_layout.num_records]
        if out is not None:
            # A later all-gather: FSDP re-allocated the storage of the tensors we
            # returned the first time; refill them in place. Autograd holds them
            # (saved for the backward matmul), so keep their version counters.
            parts = out._parts()
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tuple(parts)):
                _unpack_records(rec, parts, self.record_layout)
            out._tables = self._tables  # replaced when a checkpoint was loaded since the last gather
            return None
        parts = _alloc_parts(self.record_layout, rec.device)
        with torch.no_grad():
            _unpack_records(rec, parts, self.record_layout)
        return self._like(parts=parts, dtype=param_dtype or self.dtype), tuple(parts)


def _rebuild(inner, layout, tables_cpu, dtype, shape):
    tables = _Tables(*tables_cpu)
    if isinstance(inner, torch.Tensor):
        return Packed4bitWeight(inner, layout, tables, dtype=dtype, shape=shape)
    return Packed4bitWeight(None, layout, tables, dtype=dtype, parts=list(inner), shape=shape)


# ---------------------------------------------------------------- op handlers

def _same(t, *_, **__):
    return t._map_inner(lambda x: x)


def _split(t, split_size, dim=0):
    _dim0(t, dim, "split")
    return [t._like(records=r) for r in t._records.split(split_size, 0)]


def _split_with_sizes(t, split_sizes, dim=0):
    _dim0(t, dim, "split_with_sizes")
    return [t._like(records=r) for r in t._records.split_with_sizes(split_sizes, 0)]


def _slice(t, dim=0, start=None, end=None, step=1):
    if t._records is not None and t.dim() == 2 and dim in (1, -1) and (start or 0) == 0 and step == 1 and (
            end is None or end >= t.shape[1]):
        return t._like(records=t._records)
    _dim0(t, dim, "slice")
    if step != 1:
        raise NotImplementedError(f"Packed4bitWeight: slice with step {step} (only step 1)")
    return t._like(records=t._records[start:end])


def _new_records(t, size, dtype=None, layout=None, device=None, pin_memory=None, fill=True):
    size = list(size)
    numel = 1
    for s in size:
        numel *= s
    B = t.record_layout.record_bytes
    if numel == 0:
        rows = 0
    elif len(size) == 2 and size[1] == B:
        rows = size[0]
    else:
        raise NotImplementedError(f"Packed4bitWeight: new tensors must have shape [rows, {B}], got {size}")
    rec = torch.zeros(rows, B, dtype=torch.uint8, device=device if device is not None else t.device)
    if pin_memory:
        rec = rec.pin_memory()
    return t._like(records=rec, dtype=dtype)


def _new_zeros(t, size, dtype=None, layout=None, device=None, pin_memory=None):
    return _new_records(t, size, dtype, layout, device, pin_memory)


def _like_op(t, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if t._records is None:
        raise NotImplementedError("Packed4bitWeight: *_like of the gathered form")
    return _new_records(t, list(t._records.shape), dtype, layout, device, pin_memory)


def _check_layouts(dst, src, op):
    if not isinstance(src, Packed4bitWeight):
        raise NotImplementedError(f"Packed4bitWeight: {op} from a {type(src).__name__} (only from another "
                                  f"Packed4bitWeight)")
    if dst.record_layout != src.record_layout:
        raise ValueError(f"Packed4bitWeight: {op} between different weights: {dst.record_layout.describe()} vs "
                         f"{src.record_layout.describe()}")


def _copy_(dst, src, non_blocking=False):
    _check_layouts(dst, src, "copy_")
    if (dst._records is None) != (src._records is None):
        raise NotImplementedError("Packed4bitWeight: copy_ between the records and the gathered forms")
    if dst._records is not None:
        dst._records.copy_(src._records, non_blocking)
    else:
        for d, s in zip(dst._parts(), src._parts()):
            d.copy_(s, non_blocking)
    return dst


def _view(t, size, *_):
    size = list(size)
    if -1 in size:
        known = 1
        for s in size:
            if s != -1:
                known *= s
        size[size.index(-1)] = t.numel() // max(known, 1)
    numel = 1
    for s in size:
        numel *= s
    if numel != t.numel():
        raise RuntimeError(f"Packed4bitWeight: cannot view shape {list(t.shape)} as {size}")
    # Metadata only: the inner tensors stay as they are. FSDP2 keeps a flat
    # view of the padded shard as its bookkeeping handle and never slices it.
    if t._records is not None:
        return t._like(records=t._records, shape=tuple(size))
    return t._like(parts=t._parts(), shape=tuple(size))


def _as_strided(t, size, stride, storage_offset=None):
    if (storage_offset or 0) != 0:
        raise NotImplementedError("Packed4bitWeight: as_strided with a storage offset")
    return _view(t, size)


def _to_copy(t, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    # The codes are bytes: a dtype change only relabels the wrapper (the
    # dtype the weight is dequantized to is part of the layout, unchanged).
    dev = device if device is not None else t.device

    def move(x):
        x = x.to(dev, non_blocking=non_blocking)
        return x.pin_memory() if pin_memory else x

    return t._map_inner(move, dtype=dtype)


def _clone(t, memory_format=None):
    return t._map_inner(lambda x: x.clone())


def _is_pinned(t, device=None):
    inner = t._records if t._records is not None else t._codes
    return inner.is_pinned()


def _pin_memory(t, device=None):
    return t._map_inner(lambda x: x.pin_memory())


def _record_stream(t, stream):
    for x in ([t._records] if t._records is not None else t._parts()):
        x.record_stream(stream)


_HANDLERS = {
    aten.detach.default: _same,
    aten.alias.default: _same,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_zeros,
    aten.empty_like.default: _like_op,
    aten.zeros_like.default: _like_op,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
    aten.record_stream.default: _record_stream,
}


# ---------------------------------------------------------------- module helpers

def packed_local(w) -> Optional[Packed4bitWeight]:
    """The Packed4bitWeight behind `w` (itself, or a DTensor's local shard), else None."""
    if isinstance(w, Packed4bitWeight):
        return w
    local = getattr(w, "_local_tensor", None)
    return local if isinstance(local, Packed4bitWeight) else None


def is_sharded(w) -> bool:
    """True for a DTensor (FSDP2-sharded) parameter holding Packed4bitWeight records."""
    return not isinstance(w, Packed4bitWeight) and packed_local(w) is not None


__all__ = ["Packed4bitWeight", "RecordLayout", "is_sharded", "packed_local"]

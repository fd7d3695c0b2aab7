"""Functional API: 4-bit and 8-bit blockwise quantization on QuantState.

Layout and math follow the bitsandbytes format (SPEC: packed NF4/FP4 codes,
float32 or double-quantized absmax), so weights move between the two
libraries unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, Optional, Tuple

import torch

from . import ops

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

_code_cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}


def _cached(kind: str, device, build) -> torch.Tensor:
    # One copy per device, made once: no host->device copy on later calls.
    device = torch.device(device)
    key = (kind, device)
    t = _code_cache.get(key)
    if t is None:
        t = build().to(device)
        _code_cache[key] = t
    return t


def get_4bit_code(quant_type: str = "nf4", device="cpu") -> torch.Tensor:
    """The 16-entry code book (float32) of 'nf4' or 'fp4' (bnb's FP4)."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        build = lambda: torch.tensor(_NF4, dtype=torch.float32)  # noqa: E731
    else:
        def build():
            mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
            return torch.cat([mags, -mags]) / 12.0

    return _cached(quant_type, device, build)


def get_dynamic_map(signed: bool = True, device="cpu") -> torch.Tensor:
    """The 256-entry 8-bit dynamic map (float32): nested scales use the signed
    one, optimizer second moments the unsigned one."""
    return _cached("dyn_signed" if signed else "dyn_unsigned", device, lambda: ops.dynamic_map(signed))


def _check_quant_type(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize, name="blocksize"):
    if not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name, key) -> torch.dtype:
    dt = getattr(torch, str(name), None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"quant state: {key} {name!r} is not a torch dtype name")
    return dt


def _check_finite_scales(key: str, t: Optional[torch.Tensor], where: str) -> None:
    """Refuses NaN/Inf in loaded float scales and code maps (uint8 codes and meta tensors pass)."""
    if t is None or not t.is_floating_point() or t.is_meta or t.numel() == 0:
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        first = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"quant state{where}: '{key}' holds NaN or Inf ({int(bad.sum())} of {t.numel()} values, the first at "
            f"index {first}, {t.flatten()[first].item()}); it must be finite (the checkpoint is corrupted)"
        )


@dataclasses.dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit weight.

    absmax is float32 [nblocks], or, with double quantization, uint8 codes of
    (absmax - offset) in the signed dynamic map, scaled per nested block of 256
    by nested_absmax.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = get_4bit_code(self.quant_type, self.absmax.device)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device, non_blocking: bool = False) -> "QuantState":
        """A copy of the state on `device` (tensors only; shape and metadata shared)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(
            self,
            absmax=mv(self.absmax),
            code=mv(self.code),
            offset=mv(self.offset),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
        )

    def quant_args(self):
        """The scale arguments of the dequantize/matmul ops, in schema order."""
        return (self.absmax, self.code, self.blocksize, self.nested_absmax, self.nested_code, self.offset,
                self.nested_blocksize)

    def dequantized_absmax(self) -> torch.Tensor:
        """The float32 per-block scales, undoing double quantization."""
        if not self.nested:
            return self.absmax
        am = ops.dequantize_8bit_blockwise(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return am + self.offset

    # ---- bitsandbytes / transformers checkpoint layout (SPEC section 7)

    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """State tensors under `prefix` (e.g. 'layer.weight.'): absmax, quant_map,
        nested_absmax, nested_quant_map and the packed JSON of the rest."""
        sd = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested:
            sd[prefix + "nested_absmax"] = self.nested_absmax
            sd[prefix + "nested_quant_map"] = self.nested_code.clone()
            meta.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=float(self.offset.item()),
            )
        blob = json.dumps(meta).encode("utf-8")
        sd[prefix + "quant_state.bitsandbytes__" + self.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], prefix: str = "", device=None) -> "QuantState":
        """Reads the layout to_state_dict writes (and bitsandbytes saves)."""
        where = f" under prefix {prefix!r}" if prefix else ""
        qs_keys = [k for k in sd if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise KeyError(
                f"quant state{where}: expected exactly one key '{prefix}quant_state.bitsandbytes__nf4' "
                f"(or __fp4), found {qs_keys or 'none'}"
            )
        qs_key = qs_keys[0]
        quant_type = qs_key.rsplit("__", 1)[1]
        try:
            meta = json.loads(bytes(sd[qs_key].cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"quant state{where}: '{qs_key}' does not hold valid UTF-8 JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"quant state{where}: '{qs_key}' holds {type(meta).__name__}, expected a JSON object")
        for k in ("blocksize", "dtype", "shape"):
            if k not in meta:
                raise ValueError(f"quant state{where}: JSON in '{qs_key}' lacks '{k}' (has {sorted(meta)})")
        if meta.get("quant_type", quant_type) != quant_type:
            raise ValueError(f"quant state{where}: key says {quant_type!r} but JSON says {meta['quant_type']!r}")
        _check_quant_type(quant_type)
        _check_blocksize(meta["blocksize"], "blocksize in the quant state")
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"quant state{where}: shape must be a list of non-negative ints, got {shape!r}")

        def need(name):
            if prefix + name not in sd:
                raise KeyError(f"quant state{where}: missing key '{prefix + name}'")
            t = sd[prefix + name]
            return t.to(device) if device is not None else t

        absmax = need("absmax")
        code = need("quant_map")
        nested = "nested_offset" in meta or prefix + "nested_absmax" in sd
        kw = {}
        if nested:
            for k in ("nested_offset", "nested_blocksize"):
                if k not in meta:
                    raise ValueError(f"quant state{where}: double-quantized state lacks '{k}' in its JSON")
            _check_blocksize(meta["nested_blocksize"], "nested_blocksize in the quant state")
            off = meta["nested_offset"]
            if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
                raise ValueError(f"quant state{where}: 'nested_offset' in the JSON of '{qs_key}' must be a finite "
                                 f"number, got {off!r}")
            kw = dict(
                nested_absmax=need("nested_absmax"),
                nested_code=need("nested_quant_map"),
                offset=torch.tensor(float(off), dtype=torch.float32, device=absmax.device),
                nested_blocksize=meta["nested_blocksize"],
            )
        state = cls(
            absmax=absmax,
            shape=torch.Size(shape),
            dtype=_dtype_from_name(meta["dtype"], "dtype"),
            blocksize=meta["blocksize"],
            quant_type=quant_type,
            code=code,
            **kw,
        )
        state.validate(where=f"quant state{where}")
        # Every dequantized weight of a block with a NaN/Inf scale is NaN; a
        # checkpoint holding one is corrupted (quantize_4bit never writes one).
        for name, t in (("absmax", state.absmax), ("nested_absmax", state.nested_absmax),
                        ("quant_map", state.code), ("nested_quant_map", state.nested_code)):
            _check_finite_scales(prefix + name, t, where)
        return state

    def validate(self, packed: Optional[torch.Tensor] = None, where: str = "quant state"):
        """Checks that the tensors agree with shape and block size (and with `packed`)."""
        n = self.numel
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(
                f"{where}: absmax has {self.absmax.numel()} entries, but shape {list(self.shape)} at "
                f"blocksize {self.blocksize} needs {nblocks}"
            )
        want_dtype = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want_dtype:
            raise ValueError(f"{where}: absmax must be {want_dtype} here, got {self.absmax.dtype}")
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"{where}: quant_map must be 16 float32 values, got {self.code.numel()} {self.code.dtype}")
        if self.nested:
            nn_ = -(-nblocks // self.nested_blocksize)
            if self.nested_absmax.numel() != nn_:
                raise ValueError(f"{where}: nested_absmax has {self.nested_absmax.numel()} entries, expected {nn_}")
            if self.nested_code.numel() != 256:
                raise ValueError(f"{where}: nested_quant_map must have 256 entries, got {self.nested_code.numel()}")
        if packed is not None:
            if packed.dtype != torch.uint8:
                raise ValueError(f"{where}: packed weight must be uint8, got {packed.dtype}")
            if packed.numel() != (n + 1) // 2:
                raise ValueError(
                    f"{where}: packed weight has {packed.numel()} bytes, but shape {list(self.shape)} needs {(n + 1) // 2}"
                )


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {w.dtype}")


def _raise_non_finite(absmax, blocksize, name="w"):
    bad = torch.nonzero(~torch.isfinite(absmax)).flatten()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(
            f"{name} holds NaN or Inf: {bad.numel()} block(s) of {blocksize} elements are affected, the first "
            f"is block {b} (flat elements {b * blocksize}..{(b + 1) * blocksize - 1}); 4-bit quantization needs finite weights"
        )


def double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """(qabsmax uint8, nested_absmax float32, offset float32 0-dim, code) for float32 absmax.

    offset is the mean of absmax, summed in float64 and rounded once, so CPU
    and CUDA agree exactly; bitsandbytes sums in float32 (the two can differ
    in the last bit, which moves a nested code only at an exact tie).
    """
    offset = absmax.double().mean().float() if absmax.numel() else absmax.new_zeros(())
    code = get_dynamic_map(True, absmax.device)
    q, nested_absmax = ops.quantize_8bit_blockwise(absmax - offset, code, blocksize)
    return q, nested_absmax, offset, code


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    check_finite: bool = True,
) -> Tuple[torch.Tensor, QuantState]:
    """Quantizes `w` (any shape, fp16/bf16/fp32, on CPU or CUDA) to packed 4-bit codes.

    Returns (packed uint8 [(n+1)//2, 1], QuantState). With double_quant the
    per-block absmax is itself quantized to 8 bits (about 4.127 bits per
    weight in all instead of 4.5). check_finite raises ValueError on NaN/Inf
    weights (one small device->host read); without it, a block holding a
    non-finite value gets absmax NaN. An all-zero block gets absmax 0 and the
    code of 0.0, so it dequantizes to exact zeros. An empty tensor gives empty
    outputs.
    """
    _check_weight(w)
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    packed, absmax = ops.quantize_4bit(w, blocksize, quant_type)
    # A meta tensor holds no values to check (shapes only).
    if check_finite and absmax.numel() and absmax.device.type != "meta":
        _raise_non_finite(absmax, blocksize)
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        q, nested_absmax, offset, code = double_quantize(absmax)
        state = dataclasses.replace(state, absmax=q, nested_absmax=nested_absmax, nested_code=code, offset=offset)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight back in `dtype` (default: the dtype it was quantized from), shaped as state.shape."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    state.validate(packed)
    return ops.dequantize_4bit(packed, state.absmax, state.code, state.blocksize, state.shape, dtype or state.dtype,
                               state.nested_absmax, state.nested_code, state.offset, state.nested_blocksize)


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None, blocksize: int = 256):
    """8-bit blockwise quantization against a 256-entry map (default: the signed dynamic map).

    Returns (uint8 codes shaped like A, float32 absmax per block)."""
    _check_weight(A, "A")
    _check_blocksize(blocksize)
    if code is None:
        code = get_dynamic_map(True, A.device)
    return ops.quantize_8bit_blockwise(A, code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    if code is None:
        code = get_dynamic_map(True, q.device)
    return ops.dequantize_8bit_blockwise(q, absmax, code, blocksize, dtype)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None):
    """x[..., K] @ W^T (+ bias) for the 4-bit weight W [N, K] described by `state`.

    The result has x's dtype; gradients flow to x and bias (the weight is
    frozen). Shape metadata is taken from `state`, so no device work happens
    before the kernel.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight [out_features, in_features], got shape {list(state.shape)}")
    N, K = state.shape
    return ops.gemm_4bit(x, packed, state.absmax, state.code, state.blocksize, N, K, state.nested_absmax,
                         state.nested_code, state.offset, state.nested_blocksize, bias)

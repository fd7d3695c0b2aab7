"""Linear4bit: a frozen 4-bit weight (NF4/FP4, bitsandbytes layout) with an
optional bias and LoRA adapters, a drop-in for nn.Linear."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as TF

from .. import functional as F
from ._lora_fn import lora_4bit
from .packed_weight import Packed4bitWeight, is_sharded, packed_local

_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Linear4bit(nn.Module):
    """y = x @ dequant(W)^T + bias + (alpha / r) * dropout(x) @ A^T @ B^T.

    The weight is stored packed (`weight`, a frozen uint8 Parameter holding
    [(out*in + 1) // 2, 1] codes) with its `quant_state`; it never exists in
    16 bits during training. LoRA adapters are float32 Parameters `lora_A`
    [r, in] (Kaiming-uniform, as PEFT initialises it) and `lora_B` [out, r]
    (zeros), so a fresh layer computes exactly what the base layer does. The
    adapters are kept in float32 for the optimizer and cast to compute_dtype
    for the matmuls (bf16 tensor cores, fp32 accumulation).

    For FSDP2, `pack_for_sharding()` (lowbit.distributed.shard_model calls it)
    turns `weight` into a Packed4bitWeight: the same bytes cut into records
    that fully_shard can split across ranks and all-gather as uint8. The quant
    state then lives inside the weight; `quant_state` reads it from there
    (only while the layer is gathered, when the weight is sharded).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device=None,
        dtype: Optional[torch.dtype] = None,
        _quantized=None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        if _quantized is None:
            # A placeholder weight (zeros) until load_state_dict fills it.
            w = torch.zeros(out_features, in_features, device=device, dtype=dtype or compute_dtype)
            _quantized = F.quantize_4bit(w, blocksize, quant_type, double_quant, check_finite=False)
        packed, state = _quantized
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or compute_dtype)) if bias else None
        self.r = 0
        self.lora_A = None
        self.lora_B = None
        self.lora_dropout = None
        if r:
            self.add_lora(r, lora_alpha, lora_dropout)

    # ---------------------------------------------------------------- building

    def add_lora(self, r: int, lora_alpha: Optional[float] = None, lora_dropout: float = 0.0):
        """Attaches fresh LoRA adapters (A Kaiming-uniform, B zeros)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        alpha = float(r if lora_alpha is None else lora_alpha)
        dev = self.weight.device
        self.r = r
        self.lora_alpha = alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else None
        return self

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> "Linear4bit":
        """Quantizes an nn.Linear (on `device`, default the layer's own)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        dev = torch.device(device) if device is not None else linear.weight.device
        w = linear.weight.detach()
        if w.is_meta:
            raise ValueError("from_linear: the layer's weight is on the meta device; load real weights first")
        try:
            quantized = F.quantize_4bit(w.to(dev), blocksize, quant_type, double_quant)
        except ValueError as e:
            raise ValueError(f"from_linear: {e}") from None
        self = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, r=r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                   compute_dtype=compute_dtype, device=dev, _quantized=quantized)
        if linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias.detach())
            self.bias.requires_grad_(linear.bias.requires_grad)
        return self

    # ---------------------------------------------------------------- the weight

    @property
    def quant_state(self) -> F.QuantState:
        local = packed_local(self._parameters.get("weight"))
        if local is None:
            return self.__dict__["_quant_state"]
        return local.unpacked()[1]

    @quant_state.setter
    def quant_state(self, state: F.QuantState):
        self.__dict__["_quant_state"] = state

    def _weight_and_state(self):
        """(packed codes, QuantState) in the single-GPU layout, whatever form the weight is in."""
        w = self.weight
        if type(w) is Packed4bitWeight:
            return w.unpacked()
        if is_sharded(w):
            raise RuntimeError(
                "Linear4bit: the 4-bit weight is sharded by FSDP2 and not gathered; run the model through the "
                "module fully_shard wrapped (its pre-forward hook gathers the weight), or gather a copy with "
                "lowbit.distributed.full_state_dict(model)")
        return w, self.__dict__["_quant_state"]

    @property
    def is_packed(self) -> bool:
        """True once pack_for_sharding() turned the weight into a Packed4bitWeight."""
        return packed_local(self._parameters.get("weight")) is not None

    def pack_for_sharding(self) -> "Linear4bit":
        """Re-lays the weight as a Packed4bitWeight (records FSDP2 can shard on dim 0).

        Same codes and scales, byte for byte: state_dict() still writes the
        bitsandbytes layout. Call before fully_shard; idempotent."""
        if not self.is_packed:
            w = Packed4bitWeight.from_quantized(self.weight, self.__dict__["_quant_state"])
            self.weight = nn.Parameter(w, requires_grad=False)
            self.__dict__["_quant_state"] = None  # the scales now live in the records
        return self

    # ---------------------------------------------------------------- compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError(f"Linear4bit({self.in_features} -> {self.out_features}): the input must have at least "
                             f"one dimension (the features), got a 0-dim tensor")
        if not x.is_floating_point():
            raise TypeError(f"Linear4bit({self.in_features} -> {self.out_features}): the input must be a floating "
                            f"point tensor (float32, float16 or bfloat16), got dtype {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit({self.in_features} -> {self.out_features}): input's last dimension is "
                f"{x.shape[-1]}, expected {self.in_features}"
            )
        in_dtype = x.dtype
        lead = x.shape[:-1]
        xc = x.to(self.compute_dtype).reshape(-1, self.in_features)
        packed, state = self._weight_and_state()
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Training (eager): one autograd node for the whole layer call.
            p = self.lora_dropout.p if self.lora_dropout is not None and self.training else 0.0
            out = lora_4bit(xc.contiguous(), self.lora_A, self.lora_B, self.bias, packed, state,
                            self.scaling if self.lora_A is not None else 1.0, p)
            out = out.view(*lead, self.out_features)
            return out.to(in_dtype) if in_dtype != self.compute_dtype else out
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        out = F.matmul_4bit(xc, packed, state, bias)
        if self.lora_A is not None:
            h = self.lora_dropout(xc) if self.lora_dropout is not None and self.training else xc
            a = self.lora_A.to(self.compute_dtype)
            b = self.lora_B.to(self.compute_dtype)
            # base + scaling * (h A^T) B^T as one GEMM with beta=1: the adapter
            # output is accumulated onto the base result, no separate add kernel.
            out = torch.addmm(out, TF.linear(h, a), b.t(), alpha=self.scaling)
        out = out.view(*lead, self.out_features)
        return out.to(in_dtype) if in_dtype != self.compute_dtype else out

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        packed, state = self._weight_and_state()
        return F.dequantize_4bit(packed, state, dtype or self.compute_dtype)

    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A 16-bit nn.Linear computing W + scaling * B @ A (W dequantized).

        There is no unmerge: folding the adapters back into 4 bits would
        re-quantize the weight and lose the base model's exact values."""
        dtype = dtype or self.compute_dtype
        w = self.dequantized_weight(torch.float32)
        if self.lora_A is not None:
            w = w + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin

    # ---------------------------------------------------------------- devices

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the packed weight (uint8: never cast by .to(dtype));
        # the quant state follows it to the same device and keeps its dtypes.
        super()._apply(fn, recurse)
        if self.is_packed:
            return self  # the records moved with the weight
        if self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # ---------------------------------------------------------------- checkpoints

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if is_sharded(self._parameters["weight"]):
            # FSDP2-sharded: this rank's records only (a DTensor, like every
            # sharded parameter); lowbit.distributed.full_state_dict gathers
            # them into the layout below.
            return
        packed, state = self._weight_and_state()
        if packed is not self._parameters["weight"]:
            destination[prefix + "weight"] = packed if keep_vars else packed.detach()
        for k, v in state.to_state_dict(prefix + "weight.").items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        qs = {k: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        layer = prefix[:-1] or "Linear4bit"
        if wkey in state_dict and packed_local(state_dict[wkey]) is not None:
            self._load_packed(state_dict[wkey], layer)
        elif wkey in state_dict:
            packed = state_dict[wkey]
            # A layer built on the meta device (a model skeleton) takes the
            # checkpoint's tensors where they are; moving them to meta would drop them.
            dev = None if self.weight.is_meta else self.weight.device
            try:
                state = F.QuantState.from_state_dict(qs, wkey + ".", device=dev)
                state.validate(packed, where=f"{layer}: quant state")
            except (KeyError, ValueError) as e:
                raise ValueError(f"{layer}: cannot load the 4-bit weight: {e}") from None
            if list(state.shape) != [self.out_features, self.in_features]:
                raise ValueError(
                    f"{layer}: checkpoint weight has shape {list(state.shape)}, this layer is "
                    f"[{self.out_features}, {self.in_features}]"
                )
            packed = packed if dev is None else packed.to(dev)
            if self.is_packed:
                self._load_into_packed(Packed4bitWeight.from_quantized(packed, state), layer)
            else:
                self.weight = nn.Parameter(packed.view(-1, 1).clone(), requires_grad=False)
                self.quant_state = state
            self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested
        # The rest (bias, LoRA) loads the usual way; the packed weight was taken above.
        rest = {k: v for k, v in state_dict.items() if not (k == wkey or k.startswith(wkey + "."))}
        params = self._parameters
        order = list(params)
        weight = params.pop("weight")
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            # Back in its place: state_dict() keeps the order it had before loading.
            rest_params = dict(params)
            params.clear()
            params.update((k, weight if k == "weight" else rest_params[k]) for k in order if k == "weight" or k in rest_params)
            params.update((k, v) for k, v in rest_params.items() if k not in params)
        if wkey not in state_dict and strict:
            missing_keys.append(wkey)

    def _load_into_packed(self, full: Packed4bitWeight, layer: str):
        """Copies all records of `full` (or this rank's share of them) into the packed weight, in place:
        FSDP2 keeps references to the sharded parameter and its padded storage."""
        w = self._parameters["weight"]
        mine = packed_local(w)
        if full.record_layout != mine.record_layout:
            raise ValueError(f"{layer}: cannot load a 4-bit weight with {full.record_layout.describe()} into this packed "
                             f"layer ({mine.record_layout.describe()}); load it before lowbit.distributed.shard_model")
        rec = mine.records()
        start = 0
        if is_sharded(w):
            world, rank = w.device_mesh.size(), w.device_mesh.get_local_rank()
            start = rank * -(-mine.record_layout.num_records // world)
        with torch.no_grad():
            rec.copy_(full.records()[start:start + rec.shape[0]])
        mine._tables = full._tables  # the code book, nested map and offset come with the weight

    def _load_packed(self, src, layer: str):
        """Loads a weight saved from a packed layer: a whole Packed4bitWeight, or a
        rank's FSDP2 shard (DTensor) saved by model.state_dict() under fully_shard."""
        local = packed_local(src)
        if not is_sharded(src) and local.is_complete:
            if self.is_packed:
                self._load_into_packed(local, layer)
            else:
                packed, state = local.unpacked()
                self.weight = nn.Parameter(packed.clone(), requires_grad=False)
                self.quant_state = state
            return
        w = self._parameters["weight"]
        saved_world = src.device_mesh.size() if is_sharded(src) else None
        world = w.device_mesh.size() if is_sharded(w) else 1
        mine = packed_local(w)
        if saved_world != world or mine is None or mine.record_layout != local.record_layout or \
                mine.records().shape[0] != local.records().shape[0]:
            raise ValueError(
                f"{layer}: the checkpoint holds one rank's shard of the 4-bit weight ({local.records().shape[0]} of "
                f"{local.record_layout.num_records} records, saved with world size {saved_world or 'unknown'}); this layer "
                f"is {'sharded over world size ' + str(world) if is_sharded(w) else 'not sharded'}. A rank-local "
                f"(sharded) state dict loads only into the same sharding: save with "
                f"lowbit.distributed.full_state_dict(model) to load under another world size")
        with torch.no_grad():
            mine.records().copy_(local.records())
        mine._tables = local._tables

    def extra_repr(self) -> str:
        local = packed_local(self._parameters.get("weight"))
        L = local.record_layout if local is not None else self.quant_state
        double_quant = L.nested
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"quant_type={L.quant_type}, blocksize={L.blocksize}, "
             f"double_quant={double_quant}, compute_dtype={self.compute_dtype}")
        if local is not None:
            s += ", packed" + (" (sharded)" if is_sharded(self._parameters["weight"]) else "")
        if self.lora_A is not None:
            s += f", r={self.r}, lora_alpha={self.lora_alpha}"
        return s

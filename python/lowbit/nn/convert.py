"""Whole-model conversion: every eligible nn.Linear becomes a Linear4bit."""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .linear4bit import Linear4bit


@dataclasses.dataclass
class ConversionSummary:
    layers_converted: int
    converted: List[str]
    trainable_params: int
    total_params: int
    bytes_before: int
    bytes_after: int

    def __str__(self):
        return (
            f"converted {self.layers_converted} linear layers to 4 bits; linear weights "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB; "
            f"trainable parameters {self.trainable_params:,} of {self.total_params:,}"
        )


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    # PEFT's rule: a pattern matches the full module path or its last components.
    if patterns is None:
        return True
    return any(name == p or name.endswith("." + p) for p in patterns)


def _tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _state_bytes(m: Linear4bit) -> int:
    st = m.quant_state
    return _tensor_bytes(m.weight) + sum(
        _tensor_bytes(t) for t in (st.absmax, st.nested_absmax, st.offset, m.bias)
    )


def quantize_model(
    model: nn.Module,
    lora_r: int = 16,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    target_modules: Optional[Iterable[str]] = None,
    skip_modules: Iterable[str] = ("lm_head",),
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
    double_quant: bool = True,
    device=None,
    progress: bool = True,
) -> ConversionSummary:
    """Converts, in place, every nn.Linear of `model` whose name matches
    `target_modules` (all when None) and not `skip_modules` into a Linear4bit
    with LoRA adapters of rank `lora_r` (0: none), then freezes everything but
    the adapters.

    Layers are converted one at a time (moved to `device` first when given), and
    each original weight is released before the next, so peak memory stays near
    one layer above the converted model. Returns a ConversionSummary.
    """
    targets = list(target_modules) if target_modules is not None else None
    skips = list(skip_modules or ())
    if lora_r < 0:
        raise ValueError(f"lora_r must be >= 0, got {lora_r}")
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and _matches(n, targets) and not (skips and _matches(n, skips))
    ]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"quantize_model: no nn.Linear matched target_modules={targets} (skip_modules={skips}); "
            f"the model's linear layers are: {linears[:20]}{' ...' if len(linears) > 20 else ''}"
        )
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(names), desc="quantizing to 4 bits", unit="layer")
        except ImportError:
            bar = None
    before = after = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        before += _tensor_bytes(lin.weight) + _tensor_bytes(lin.bias)
        q = Linear4bit.from_linear(
            lin, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, quant_type=quant_type,
            blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, device=device,
        )
        setattr(parent, child, q)
        after += _state_bytes(q)
        del lin
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name[-40:])
    if bar is not None:
        bar.close()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.lora_A is not None:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ConversionSummary(len(names), names, trainable, total, before, after)

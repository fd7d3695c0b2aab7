"""LoRA adapters in PEFT's on-disk format (adapter_model.safetensors +
adapter_config.json), so `peft.PeftModel.from_pretrained` loads them onto the
16-bit base model, and back."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from ._files import atomic_write, reading_safetensors
from .nn.linear4bit import Linear4bit

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."


def _lora_layers(model: nn.Module) -> Dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.lora_A is not None}


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: Optional[str] = None) -> str:
    """Writes the LoRA adapters of every Linear4bit in `model` to `directory` in PEFT's format."""
    from safetensors.torch import save_file

    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no Linear4bit layers with LoRA adapters")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    ranks = {n: m.r for n, m in layers.items()}
    alphas = {n: m.lora_alpha for n, m in layers.items()}
    dropouts = {m.lora_dropout.p if m.lora_dropout is not None else 0.0 for m in layers.values()}
    r0 = next(iter(ranks.values()))
    a0 = next(iter(alphas.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
    }
    atomic_write(os.path.join(directory, WEIGHTS_NAME),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)

    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)
    return directory


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_config(cpath: str) -> dict:
    """adapter_config.json, checked for what load_adapter reads from it; every
    error is a ValueError naming the file (and the key)."""
    try:
        with open(cpath, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_adapter: {cpath} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {cpath} holds a JSON {type(config).__name__}, expected an object "
                         "(PEFT's adapter config)")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {cpath} describes a {config.get('peft_type')} adapter, not LORA")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise ValueError(f"load_adapter: {cpath}: 'lora_alpha' must be a finite number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"load_adapter: {cpath}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"load_adapter: {cpath}: 'alpha_pattern' must be an object mapping layer names to "
                         f"numbers, got {type(pattern).__name__}")
    for k, v in pattern.items():
        if not _is_number(v):
            raise ValueError(f"load_adapter: {cpath}: 'alpha_pattern' entry {k!r} must be a finite number, got {v!r}")
    config["alpha_pattern"] = pattern
    return config


def load_adapter(model: nn.Module, directory: str, strict: bool = True) -> Dict[str, Linear4bit]:
    """Loads PEFT-format LoRA weights into the matching Linear4bit layers of
    `model` (creating adapters where a layer has none). Returns the layers set."""
    from safetensors.torch import load_file

    wpath, cpath = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapter: {p} does not exist (expected PEFT's {WEIGHTS_NAME} and {CONFIG_NAME})")
    config = _read_config(cpath)
    with reading_safetensors(wpath, "load_adapter"):
        tensors = load_file(wpath)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                found.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if strict:
                raise ValueError(f"load_adapter: unexpected tensor {key!r} in {wpath}")
    missing = [n for n in found if n not in modules]
    if missing and strict:
        raise ValueError(f"load_adapter: no Linear4bit named {missing[:5]} in the model (adapter from {directory})")
    done = {}
    for name, parts in found.items():
        m = modules.get(name)
        if m is None:
            continue
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"load_adapter: layer {name!r} has only {sorted(parts)} in {wpath}")
        a, b = parts["lora_A"], parts["lora_B"]
        r = a.shape[0]
        if a.shape != (r, m.in_features) or b.shape != (m.out_features, r):
            raise ValueError(
                f"load_adapter: layer {name!r} expects lora_A [r, {m.in_features}] and lora_B "
                f"[{m.out_features}, r], got {list(a.shape)} and {list(b.shape)}"
            )
        alpha = config["alpha_pattern"].get(name, config.get("lora_alpha", r))
        if m.lora_A is None or m.r != r:
            m.add_lora(r, alpha, float(config.get("lora_dropout", 0.0)))
        m.lora_alpha, m.scaling = float(alpha), float(alpha) / r
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
        done[name] = m
    return done

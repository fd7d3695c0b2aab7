"""Whole models on disk in the Hugging Face layout: 4-bit checkpoints that
transformers + bitsandbytes write and read (config.json with a bitsandbytes
`quantization_config`, safetensors shards holding each quantized Linear as
SPEC section 7 lays it out), and 16-bit checkpoints loaded straight into 4 bits.

LoRA adapters are not part of these checkpoints: save them with
`lowbit.save_adapter` (PEFT's format) and attach them with `lowbit.load_adapter`.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from .. import functional as F
from ..nn.convert import ConversionSummary, _matches, _state_bytes, _tensor_bytes
from ..nn.linear4bit import Linear4bit
from . import shards as S
from . import skeleton as K

GENERATION_CONFIG_NAME = "generation_config.json"
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QS_RE = re.compile(r"quant_state\.bitsandbytes__\w+")


# ------------------------------------------------------------------ config


def quantization_config_dict(quant_type: str = "nf4", double_quant: bool = True,
                             compute_dtype: torch.dtype = torch.bfloat16,
                             skip_modules: Optional[List[str]] = None) -> dict:
    """The `quantization_config` transformers writes for bitsandbytes 4 bits
    (the keys and order of BitsAndBytesConfig.to_dict()), so transformers and
    PEFT recognise a lowbit checkpoint as a bnb 4-bit model."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def _is_bnb_4bit(q) -> bool:
    return (isinstance(q, dict) and q.get("quant_method") == "bitsandbytes"
            and bool(q.get("load_in_4bit", q.get("_load_in_4bit", False))))


def _check_4bit_config(cfg: dict, path: str) -> dict:
    q = cfg.get("quantization_config")
    if _is_bnb_4bit(q):
        return q
    if q is None:
        raise ValueError(f"load_quantized: {path} has no quantization_config, so the weights are not 4-bit; "
                         f"use lowbit.load_pretrained_4bit to quantize a 16-bit model while loading it")
    method = q.get("quant_method") if isinstance(q, dict) else None
    what = "8-bit bitsandbytes" if method == "bitsandbytes" else f"quant_method {method!r}"
    raise ValueError(f"load_quantized: {path} describes a {what} model; expected quant_method 'bitsandbytes' "
                     f"with load_in_4bit true (for a 16-bit model use lowbit.load_pretrained_4bit)")


def _dtype(name, what: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{what}: {name!r} is not a torch dtype")
    return dt


def _config_json(model: nn.Module, config, qdict: dict) -> Optional[str]:
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        out = dict(config)
        out["quantization_config"] = qdict
        return json.dumps(out, indent=2, sort_keys=True) + "\n"
    if hasattr(config, "to_json_string"):
        config = copy.deepcopy(config)
        config.quantization_config = qdict
        return config.to_json_string(use_diff=True)
    raise TypeError(f"save_quantized: config must be a transformers PretrainedConfig or a dict, "
                    f"got {type(config).__name__}")


# ------------------------------------------------------------------ save


def _tied_duplicates(model: nn.Module) -> Set[str]:
    """Names of tied parameters after their first occurrence (e.g. lm_head.weight
    tied to embed_tokens.weight): saved once, as transformers does, and re-tied
    on load."""
    seen: Set[int] = set()
    dups = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dups.add(n)
        seen.add(id(p))
    return dups


def _meta_tensor_names(model: nn.Module, layers: Dict[str, Linear4bit]) -> List[str]:
    """Names of the tensors save_quantized would write that live on the meta
    device (LoRA factors are not written, so they are not looked at)."""
    lora = {f"{n}.{k}" for n, m in layers.items() if m.lora_A is not None for k in ("lora_A", "lora_B")}
    names = [n for n, t in model.named_parameters() if t.is_meta and n not in lora]
    names += [n for n, t in model.named_buffers() if t.is_meta]
    for n, m in layers.items():
        st = m.quant_state
        for k, t in (("absmax", st.absmax), ("quant_map", st.code), ("nested_absmax", st.nested_absmax),
                     ("nested_quant_map", st.nested_code), ("nested_offset", st.offset)):
            if t is not None and t.is_meta:
                names.append(f"{n}.weight.{k}")
    return list(dict.fromkeys(names))


def save_quantized(model: nn.Module, directory: str, config=None, safe_serialization: bool = True,
                   max_shard_size="5GB") -> List[str]:
    """Writes a model converted by lowbit (Linear4bit layers) as a bitsandbytes
    4-bit checkpoint: safetensors shards (+ model.safetensors.index.json when
    there are several) and, for a transformers model or when `config` (a
    PretrainedConfig or a dict) is given, config.json with `quantization_config`.

    transformers + bitsandbytes and `lowbit.load_quantized` read the result.
    LoRA adapters are left out (use `lowbit.save_adapter`). Every file is
    written to a temporary name and renamed into place. Returns the shard names.
    """
    if not safe_serialization:
        raise ValueError("save_quantized writes safetensors only; safe_serialization=False is not supported")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("save_quantized: the model has no Linear4bit layers; convert it first with "
                         "lowbit.quantize_model (or save a 16-bit model with save_pretrained)")
    max_bytes = S.parse_size(max_shard_size)
    # Before state_dict(): a quant state on meta cannot even be serialized
    # (its nested offset is read with .item()).
    meta = _meta_tensor_names(model, layers)
    if meta:
        raise ValueError(f"save_quantized: tensors on the meta device cannot be saved: {meta[:5]}"
                         f"{f' (and {len(meta) - 5} more)' if len(meta) > 5 else ''}; load or materialize the "
                         "weights first")
    sd = model.state_dict()
    for name, m in layers.items():
        if m.lora_A is not None:
            sd.pop(f"{name}.lora_A", None)
            sd.pop(f"{name}.lora_B", None)
    for n in _tied_duplicates(model):
        sd.pop(n, None)
    # safetensors refuses tensors sharing memory; the 16-entry code books of all
    # layers are one cached tensor, so each key gets its own copy where needed.
    storages: Set[Tuple[str, int]] = set()
    for k, v in sd.items():
        sid = (str(v.device), v.untyped_storage().data_ptr())
        if sid in storages:
            sd[k] = v.clone()
        storages.add(sid)

    # One group per Linear4bit (packed weight, quant state and bias stay in one
    # shard), one per other tensor, in state_dict order.
    layer_names = set(layers)
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        groups.setdefault(_four_bit_owner(k, layer_names) or k, {})[k] = v
    os.makedirs(directory, exist_ok=True)
    names = S.write_shards(directory, S.plan_shards(list(groups.values()), max_bytes))

    skipped = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    kinds = collections.Counter((m.quant_state.quant_type, m.quant_state.nested) for m in layers.values())
    (quant_type, nested), _ = kinds.most_common(1)[0]
    compute_dtype = next(iter(layers.values())).compute_dtype
    qdict = quantization_config_dict(quant_type, nested, compute_dtype, skipped)
    text = _config_json(model, config, qdict)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        S.atomic_write_text(os.path.join(directory, GENERATION_CONFIG_NAME), gen.to_json_string(use_diff=True))
    if text is not None:
        # Last: config.json is what marks the directory as a 4-bit model.
        S.atomic_write_text(os.path.join(directory, K.CONFIG_NAME), text)
    return names


# ------------------------------------------------------------------ load helpers


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _meta_linear4bit(lin: nn.Module, name: str, compute_dtype, **kw) -> Linear4bit:
    if not isinstance(lin, (nn.Linear, Linear4bit)):
        raise ValueError(f"{name}: the checkpoint holds a 4-bit weight for it, but the model's module there is "
                         f"{type(lin).__name__}, not nn.Linear")
    return Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                      device="meta", **kw)


def _ignored(model: nn.Module, key: str) -> bool:
    pats = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, key) for p in pats)


def _check_keys(model: nn.Module, ckpt_keys: Iterable[str], expected: List[str], grouped: Set[str],
                directory: str, who: str) -> None:
    """Names every key the model needs that the checkpoint lacks (a tied alias
    counts as present), and every checkpoint key the model has no place for."""
    ckpt = set(ckpt_keys)
    alias = K.aliases(model)
    missing = [k for k in expected if k not in ckpt and not (alias.get(k, {k}) & ckpt)]
    if missing:
        raise ValueError(f"{who}: {directory} lacks {len(missing)} tensor(s) the model needs: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    known = set(expected)
    unexpected = [k for k in ckpt if k not in known and k not in grouped and not _ignored(model, k)]
    if unexpected:
        unexpected.sort()
        raise ValueError(f"{who}: {directory} holds {len(unexpected)} tensor(s) the model has no place for: "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="tensor")


def _stream(shard_list, device: torch.device, bar):
    """(key, tensor on device) for every tensor, one shard open at a time; the
    files are memory-mapped, so host memory holds about one tensor at once."""
    from safetensors import safe_open

    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    for path, keys in shard_list:
        with S.reading_safetensors(path), safe_open(path, framework="pt", device=dev) as f:
            present = set(f.keys())
            for k in keys:
                if k not in present:
                    raise ValueError(f"the index lists {k!r} in {os.path.basename(path)}, which does not hold it")
                yield k, f.get_tensor(k)
                if bar is not None:
                    bar.update(1)


def _finish(model: nn.Module, device: torch.device, lora_r: int, lora_alpha, lora_dropout,
            lora_target_modules) -> None:
    """Re-ties weights, moves what is left (buffers computed at build time) to
    `device`, attaches LoRA adapters and freezes all but them, as quantize_model does."""
    K.tie_weights(model)
    left = K.meta_leftovers(model)
    if left:
        raise ValueError(f"these tensors were not loaded from the checkpoint: {left[:10]}")
    model.to(device)
    targets = list(lora_target_modules) if lora_target_modules is not None else None
    if lora_r:
        hit = 0
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit) and _matches(n, targets):
                m.add_lora(lora_r, lora_alpha, lora_dropout)
                hit += 1
        if not hit:
            raise ValueError(f"lora_target_modules={targets} matched no Linear4bit layer")
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.lora_A is not None:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    model.eval()  # as from_pretrained leaves it; call .train() to fine-tune


def _four_bit_owner(key: str, modules: Set[str]) -> Optional[str]:
    """The 4-bit module a checkpoint key belongs to (its weight, bias or quant state)."""
    head, _, last = key.rpartition(".")
    if last in ("weight", "bias") and head in modules:
        return head
    if ".weight." in key:
        mod, _, rest = key.partition(".weight.")
        if mod in modules:
            return mod
    return None


def _find_4bit_modules(keys: Iterable[str]) -> Set[str]:
    out = set()
    for k in keys:
        mod, sep, rest = k.rpartition(".weight.")
        if sep and (rest in _STATE_SUFFIXES or _QS_RE.fullmatch(rest)):
            out.add(mod)
    return out


def _load_4bit_layer(module: Linear4bit, name: str, tensors: Dict[str, torch.Tensor]) -> None:
    wkey = name + ".weight"
    packed = tensors.get(wkey)
    if packed is not None and packed.dtype != torch.uint8:
        # bnb_4bit_quant_storage other than uint8 (e.g. bfloat16 for FSDP) keeps
        # the same packed bytes in a wider element type.
        tensors = dict(tensors)
        tensors[wkey] = packed.contiguous().view(torch.uint8).reshape(-1, 1)
    missing, unexpected, errors = [], [], []
    module._load_from_state_dict(tensors, name + ".", {"assign_to_params_buffers": True}, True, missing,
                                 unexpected, errors)
    if missing or unexpected or errors:
        raise ValueError(f"{name}: cannot load the 4-bit layer: missing {missing}, unexpected {unexpected}"
                         f"{'; ' + '; '.join(errors) if errors else ''}")


# ------------------------------------------------------------------ load 4-bit


def load_quantized(directory: str, device=None, lora_r: int = 0, lora_alpha: Optional[float] = None,
                   lora_dropout: float = 0.0, lora_target_modules: Optional[Iterable[str]] = None,
                   compute_dtype: Optional[torch.dtype] = None, dtype: Optional[torch.dtype] = None,
                   model: Optional[nn.Module] = None, model_class=None, progress: bool = True) -> nn.Module:
    """Loads a bitsandbytes 4-bit checkpoint (written by lowbit.save_quantized
    or by transformers + bitsandbytes) into lowbit modules on `device` (default
    CUDA when available).

    The model is built from config.json with its parameters on the meta device
    (or `model`, a skeleton you built, is filled in); every nn.Linear with 4-bit
    tensors in the checkpoint becomes a Linear4bit (block size and quant type as
    stored), and the shards are streamed one tensor at a time onto `device`:
    packed weights and quant states go straight into the Linear4bit layers,
    everything else is kept as stored (or cast to `dtype` when given). Tied
    weights are re-tied. compute_dtype defaults to the config's
    bnb_4bit_compute_dtype (bfloat16 without a config). With lora_r > 0, fresh LoRA adapters go on every
    Linear4bit (or those matching lora_target_modules). All but the adapters
    are frozen; the model is returned in eval mode.
    """
    who = "load_quantized"
    if model is None or os.path.isfile(os.path.join(str(directory), K.CONFIG_NAME)):
        cfg = K.read_config_json(directory, who)
        q = _check_4bit_config(cfg, os.path.join(directory, K.CONFIG_NAME))
    else:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{who}: {directory!r} is not a directory")
        q = {}
    if compute_dtype is None:
        # transformers' default when the key is absent is float32; without any
        # config (a skeleton passed in), lowbit's own default.
        compute_dtype = _dtype(q.get("bnb_4bit_compute_dtype") or ("float32" if q else "bfloat16"),
                               "bnb_4bit_compute_dtype")
    device = _default_device(device)
    shard_list = S.list_shards(directory)
    keys = [k for _, ks in shard_list for k in ks]
    four = _find_4bit_modules(keys)
    if not four:
        raise ValueError(f"{who}: {directory} holds no 4-bit weights (no '<layer>.weight.absmax' / "
                         f"'.weight.quant_state.bitsandbytes__*' keys)")
    if model is None:
        model = K.build_hf_skeleton(directory, who, model_class)
    expected = K.persistent_keys(model)
    grouped = {k for k in keys if _four_bit_owner(k, four) is not None}
    modules = dict(model.named_modules())
    absent = sorted(m for m in four if m not in modules)
    if absent:
        raise ValueError(f"{who}: {directory} holds 4-bit weights for {absent[:10]}, which the model does not have")
    for name in sorted(four):
        _replace(model, name, _meta_linear4bit(modules[name], name, compute_dtype))
    expected = [k for k in expected if _four_bit_owner(k, four) is None]
    expected += [f"{n}.{p}" for n in four for p in ("weight", "bias") if getattr(model.get_submodule(n), p) is not None]
    _check_keys(model, keys, expected, grouped, directory, who)

    # Which checkpoint keys make up each 4-bit layer, so it is loaded the
    # moment its last piece arrives (a writer may split a layer across shards).
    need: Dict[str, Set[str]] = collections.defaultdict(set)
    for k in grouped:
        need[_four_bit_owner(k, four)].add(k)
    pending: Dict[str, Dict[str, torch.Tensor]] = collections.defaultdict(dict)
    expected_set = set(expected)
    bar = _progress(len(keys), "loading 4-bit checkpoint", progress)
    try:
        for k, t in _stream(shard_list, device, bar):
            owner = _four_bit_owner(k, four)
            if owner is None:
                if k not in expected_set:  # tolerated by the model's _keys_to_ignore_on_load_unexpected
                    continue
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                K.assign_tensor(model, k, t)
                continue
            pending[owner][k] = t
            if len(pending[owner]) == len(need[owner]):
                _load_4bit_layer(model.get_submodule(owner), owner, pending.pop(owner))
    finally:
        if bar is not None:
            bar.close()
    _finish(model, device, lora_r, lora_alpha, lora_dropout, lora_target_modules)
    return model


# ------------------------------------------------------------------ load 16-bit into 4 bits


def load_pretrained_4bit(directory: str, device=None, target_modules: Optional[Iterable[str]] = None,
                         skip_modules: Iterable[str] = ("lm_head",), quant_type: str = "nf4",
                         compute_dtype: torch.dtype = torch.bfloat16, lora_r: int = 16,
                         lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, blocksize: int = 64,
                         double_quant: bool = True, dtype: Optional[torch.dtype] = None,
                         model: Optional[nn.Module] = None, model_class=None,
                         progress: bool = True) -> Tuple[nn.Module, ConversionSummary]:
    """Loads a 16-bit Hugging Face model directory (safetensors shards) straight
    into 4 bits on `device` (default CUDA when available).

    The model is built with its parameters on the meta device; then each tensor
    is read onto `device`: the weight of a targeted nn.Linear (matching
    target_modules, all when None, and not skip_modules) is quantized there at
    once and its 16-bit copy dropped; every other tensor is kept as stored (or
    cast to `dtype`). Peak device memory is the 4-bit model plus one 16-bit
    tensor. The result is what quantize_model gives for the same weights (same
    bytes), including LoRA adapters of rank lora_r (0: none) and the freezing.
    Returns (model, ConversionSummary); the model is in eval mode.
    """
    who = "load_pretrained_4bit"
    if lora_r < 0:
        raise ValueError(f"{who}: lora_r must be >= 0, got {lora_r}")
    if model is None:
        cfg = K.read_config_json(directory, who)
        q = cfg.get("quantization_config")
        if _is_bnb_4bit(q):
            raise ValueError(f"{who}: {directory} already holds a 4-bit bitsandbytes model; use lowbit.load_quantized")
        if q is not None:
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise ValueError(f"{who}: {directory} holds a model quantized with {method!r}; it needs 16-bit weights")
    elif not os.path.isdir(directory):
        raise FileNotFoundError(f"{who}: {directory!r} is not a directory")
    F._check_quant_type(quant_type)
    F._check_blocksize(blocksize)
    device = _default_device(device)
    shard_list = S.list_shards(directory)
    keys = [k for _, ks in shard_list for k in ks]
    if model is None:
        model = K.build_hf_skeleton(directory, who, model_class)

    targets = list(target_modules) if target_modules is not None else None
    skips = list(skip_modules or ())
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and _matches(n, targets) and not (skips and _matches(n, skips))]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"{who}: no nn.Linear matched target_modules={targets} (skip_modules={skips}); "
                         f"the model's linear layers are: {linears[:20]}{' ...' if len(linears) > 20 else ''}")
    expected = K.persistent_keys(model)
    _check_keys(model, keys, expected, set(), directory, who)
    layers = {}
    for n in names:
        layers[n] = _meta_linear4bit(model.get_submodule(n), n, compute_dtype, quant_type=quant_type,
                                     blocksize=blocksize, double_quant=double_quant)
        _replace(model, n, layers[n])
    weight_of = {n + ".weight": n for n in names}
    bias_of = {n + ".bias": n for n in names}
    expected_set = set(expected)
    before = 0
    bar = _progress(len(keys), "loading into 4 bits", progress)
    try:
        for k, t in _stream(shard_list, device, bar):
            if k in weight_of:
                name = weight_of[k]
                m = layers[name]
                if tuple(t.shape) != (m.out_features, m.in_features):
                    raise ValueError(f"{k}: the checkpoint holds shape {list(t.shape)}, the model expects "
                                     f"{[m.out_features, m.in_features]}")
                try:
                    packed, state = F.quantize_4bit(t, blocksize, quant_type, double_quant)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                before += _tensor_bytes(t)
                del t  # the 16-bit copy goes before the next tensor is read
                m.weight = nn.Parameter(packed, requires_grad=False)
                m.quant_state = state
            elif k in bias_of:
                # quantize_model keeps a converted layer's bias in compute_dtype.
                before += _tensor_bytes(t)
                K.assign_tensor(model, k, t.to(compute_dtype))
            elif k in expected_set:
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                K.assign_tensor(model, k, t)
    finally:
        if bar is not None:
            bar.close()
    _finish(model, device, lora_r, lora_alpha, lora_dropout, None)
    after = sum(_state_bytes(m) for m in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, ConversionSummary(len(names), names, trainable, total, before, after)

"""A model's skeleton with its parameters on the meta device, and the helpers
that fill it tensor by tensor from a checkpoint."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Dict, List, Set

import torch
import torch.nn as nn

CONFIG_NAME = "config.json"


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device (no memory);
    buffers stay where the code puts them. Buffers such as rotary inv_freq
    are computed in __init__ and not saved in checkpoints, so putting them on
    meta too (as `with torch.device("meta")` would) would lose them."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def read_config_json(directory: str, who: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{who}: {directory!r} is not a directory")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: {path} does not exist; expected a Hugging Face model directory "
                                f"(config.json and safetensors weights)")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{who}: {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{who}: {path} holds {type(cfg).__name__}, expected a JSON object")
    return cfg


def build_hf_skeleton(directory: str, who: str, model_class=None) -> nn.Module:
    """The transformers model described by directory/config.json, parameters on
    meta. quantization_config is kept off the config while building so that
    transformers does not try to set up its own quantizer."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{who}: reading a Hugging Face model directory needs transformers "
                          f"(pip install transformers), or pass model= a skeleton to load into") from None
    config = transformers.AutoConfig.from_pretrained(directory)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        config = copy.deepcopy(config)
        del config.quantization_config
    cls = model_class
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM
    with parameters_on_meta():
        if hasattr(cls, "from_config"):
            model = cls.from_config(config)
        else:
            model = cls._from_config(config)
    if qconfig is not None:
        # Kept on the model for inspection (as transformers does), as a plain dict:
        # the layers are lowbit's, not bitsandbytes'.
        model.config.quantization_config = qconfig.to_dict() if hasattr(qconfig, "to_dict") else qconfig
    return model


def tie_weights(model: nn.Module) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def aliases(model: nn.Module) -> Dict[str, Set[str]]:
    """name -> every name of the same tensor (tied weights), parameters and buffers."""
    by_id: Dict[int, Set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    for n, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), set()).add(n)
    return {n: names for names in by_id.values() for n in names}


def persistent_keys(model: nn.Module) -> List[str]:
    """Keys a full state_dict of the (un-converted) skeleton has, tied duplicates included."""
    keys = []
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = mname + "." if mname else ""
        keys += [pre + n for n, p in m._parameters.items() if p is not None]
        keys += [pre + n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
    return list(dict.fromkeys(keys))


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replaces the parameter or buffer `key` by `tensor` (dtype as given),
    keeping requires_grad; the shape must match the skeleton's."""
    mname, _, attr = key.rpartition(".")
    owner = model.get_submodule(mname) if mname else model
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if old is None:
        raise KeyError(key)
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: the checkpoint holds shape {list(tensor.shape)}, the model expects {list(old.shape)}")
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        owner._buffers[attr] = tensor


def meta_leftovers(model: nn.Module) -> List[str]:
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    return names

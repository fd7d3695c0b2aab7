"""safetensors shards in the layout transformers reads and writes: one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` files plus
`model.safetensors.index.json` mapping every key to its file."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .._files import atomic_write, atomic_write_text, reading_safetensors  # noqa: F401  (re-exported)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")
# Decimal units as transformers parses them ("5GB" = 5e9 bytes); "GiB" is binary.
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}




def parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB' or '500MiB', got {size!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(groups: Sequence[Dict[str, torch.Tensor]], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """Packs groups of tensors into shards of at most max_bytes (a group larger
    than that gets a shard of its own). A group is never split, so a 4-bit
    layer's packed weight and its quant state always land in the same file."""
    shards: List[Dict[str, torch.Tensor]] = []
    cur: Dict[str, torch.Tensor] = {}
    cur_bytes = 0
    for g in groups:
        gb = sum(_nbytes(t) for t in g.values())
        if cur and cur_bytes + gb > max_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur.update(g)
        cur_bytes += gb
    if cur or not shards:
        shards.append(cur)
    return shards


def write_shards(directory: str, shards: List[Dict[str, torch.Tensor]]) -> List[str]:
    """Writes the shards (and the index when there are several), then removes
    model shard files an earlier save left that this one did not write."""
    from safetensors.torch import save_file

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
        atomic_write(os.path.join(directory, name), lambda p, c=cpu: save_file(c, p, metadata={"format": "pt"}))
        for k, v in cpu.items():
            weight_map[k] = name
            total += _nbytes(v)
        del cpu
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(os.path.join(directory, INDEX_FILE), json.dumps(index, indent=2) + "\n")
    keep = set(names) | ({INDEX_FILE} if n > 1 else set())
    for f in os.listdir(directory):
        if f not in keep and (f in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(f)):
            os.unlink(os.path.join(directory, f))
    return names


def list_shards(directory: str) -> List[Tuple[str, List[str]]]:
    """[(shard path, its keys)] of an HF model directory, in file order."""
    from safetensors import safe_open

    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        by_file: Dict[str, List[str]] = {}
        for k, fname in weight_map.items():
            by_file.setdefault(fname, []).append(k)
        out = []
        for fname in sorted(by_file):
            path = os.path.join(directory, fname)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} lists {fname}, which is not in {directory}")
            out.append((path, by_file[fname]))
        return out
    if os.path.isfile(single):
        with reading_safetensors(single), safe_open(single, framework="pt") as f:
            return [(single, list(f.keys()))]
    present = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {present}: only safetensors checkpoints are read)" if present else ""
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

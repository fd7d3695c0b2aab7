from .convert import ConversionSummary, quantize_model
from .linear4bit import Linear4bit

__all__ = ["ConversionSummary", "Linear4bit", "quantize_model"]

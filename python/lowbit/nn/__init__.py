from .convert import ConversionSummary, quantize_model
from .linear4bit import Linear4bit
from .packed_weight import Packed4bitWeight

__all__ = ["ConversionSummary", "Linear4bit", "Packed4bitWeight", "quantize_model"]

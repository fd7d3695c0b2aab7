from .convert import ConversionSummary, quantize_model
from .linear4bit import Linear4bit
from .losses import causal_lm_loss, chunked_cross_entropy, offload_activations
from .norms import fuse_rms_norms, unfuse_rms_norms
from .packed_weight import Packed4bitWeight

__all__ = ["ConversionSummary", "Linear4bit", "Packed4bitWeight", "causal_lm_loss", "chunked_cross_entropy",
           "fuse_rms_norms", "offload_activations", "quantize_model", "unfuse_rms_norms"]

"""Optimizers: AdamW with blockwise 8-bit states, plain or paged."""
from .adamw import AdamW8bit, PagedAdamW8bit, state_bytes

__all__ = ["AdamW8bit", "PagedAdamW8bit", "state_bytes"]

"""Model building blocks: paged attention, linear (TP) layers, rotary, norms, activations."""

from distserve_rt.layers.attention import AttentionMetadata, PagedAttention

__all__ = ["AttentionMetadata", "PagedAttention"]

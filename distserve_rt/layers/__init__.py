"""Model building blocks: paged attention, linear (TP) layers, rotary, norms, activations."""

from distserve_rt.layers.attention import AttentionMetadata, PagedAttention
from distserve_rt.layers.sampler import LogprobsTensors, Sampler, SamplerOutput
from distserve_rt.layers.sampling_metadata import (
    SamplingMetadata,
    generator_state,
    make_generator,
    restore_generator,
)

__all__ = [
    "AttentionMetadata",
    "LogprobsTensors",
    "PagedAttention",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "generator_state",
    "make_generator",
    "restore_generator",
]

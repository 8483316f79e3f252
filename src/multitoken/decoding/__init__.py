"""Decoding, in layers whose imports run one way: sampling -> state -> verify -> drafting ->
strategies (plain, chain, tree) -> runner (buckets, compiled blocks, CUDA graphs) -> api
(`generate`, `TextStream`). docs/decoding.md describes each layer."""

from multitoken.decoding.api import GenerationStats, TextStream, generate
from multitoken.decoding.sampling import Sampling

__all__ = ["GenerationStats", "Sampling", "TextStream", "generate"]

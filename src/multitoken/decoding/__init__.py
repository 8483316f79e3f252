"""Decoding, in layers whose imports run one way: sampling -> state -> verify -> drafting ->
strategies (plain, chain, tree) -> runner (buckets, compiled blocks, CUDA graphs) -> api
(`Engine`, `Generation`, `generate`, `TextStream`); text.py turns token streams into text.
docs/decoding.md describes each layer."""

from multitoken.decoding.api import Engine, Generation, GenerationStats, Settings, TextStream, generate
from multitoken.decoding.sampling import Sampling

__all__ = ["Engine", "Generation", "GenerationStats", "Sampling", "Settings", "TextStream", "generate"]

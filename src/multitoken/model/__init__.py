"""The model: building blocks (layers.py), the decoder (transformer.py), its static KV cache
(kv_cache.py) and the multi-token-prediction head families (heads/).

Single-device code: it imports nothing from training, decoding, io or the CLI.
"""

from multitoken.model.transformer import Transformer

__all__ = ["Transformer"]

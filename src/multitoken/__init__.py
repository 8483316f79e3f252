"""multitoken: multi-token prediction for language models.

Train a decoder with extra heads that predict several future tokens (parallel heads of
Gloeckle et al., DeepSeek-V3's sequential MTP modules, or Medusa heads on a frozen model),
then decode it faster with self-speculative decoding whose output equals plain decoding.
"""

from typing import Any

from multitoken.config import PRESETS, HeadsConfig, ModelConfig, RopeScaling, TrainConfig
from multitoken.errors import BadValue, UserError

__version__ = "0.1.0"

__all__ = ["CUSTOM_GENERATE_DIR", "PRESETS", "BadValue", "HeadsConfig", "ModelConfig", "Pipeline", "RopeScaling", "TrainConfig",
           "UserError", "__version__", "from_transformers", "generate", "hf_generate", "load"]

_LAZY = {"load": "multitoken.pipeline", "Pipeline": "multitoken.pipeline", "from_transformers": "multitoken.pipeline",
         "hf_generate": "multitoken.pipeline", "CUSTOM_GENERATE_DIR": "multitoken.pipeline", "generate": "multitoken.decoding"}


def __getattr__(name: str) -> Any:
    """`load`, `generate` and the rest of the front door are imported on first use: ``import
    multitoken`` (and the CLI's ``--help``) must not pay for torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multitoken' has no attribute {name!r}")

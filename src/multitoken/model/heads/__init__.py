"""Multi-token-prediction head families: one class per family, one file each, behind one
interface (base.py) and a registry (registry.py: kind string -> class).

- parallel.py: Gloeckle et al.'s parallel heads on a shared trunk;
- sequential.py: DeepSeek-V3's sequential MTP modules;
- medusa.py: Medusa heads, for retrofitting a frozen model.
"""

from __future__ import annotations

from multitoken.config import ModelConfig
from multitoken.model.heads.base import BackboneStates, HeadFamily, SharedModules
from multitoken.model.heads.registry import family, kinds, register_family, unregister_family


def build_heads(config: ModelConfig) -> HeadFamily | None:
    """The head family module for ``config.heads``, or None for a plain model."""
    if config.heads.kind == "none":
        return None
    return family(config.heads.kind)(config)


__all__ = ["BackboneStates", "HeadFamily", "SharedModules", "build_heads", "family", "kinds", "register_family",
           "unregister_family"]

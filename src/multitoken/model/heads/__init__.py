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


def default_loss_weights(kind: str, depth: int) -> list[float] | None:
    """The default per-depth loss weights of heads `kind` with `depth` extra depths (None: DeepSeek's
    ``1, lambda/D, ...`` form); a plain model's is ``[1.0]``."""
    return [1.0] * (depth + 1) if kind == "none" else family(kind).default_loss_weights(depth)


__all__ = ["BackboneStates", "HeadFamily", "SharedModules", "build_heads", "default_loss_weights", "family", "kinds", "register_family",
           "unregister_family"]

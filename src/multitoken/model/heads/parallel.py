"""Parallel heads (Gloeckle et al. 2024): n heads on one shared trunk.

The trunk is the first L-1 blocks; the main head is the model's own last block; head k is one
more block on the trunk output. All share the final norm and the LM head. Each head's block has
its own KV-cache layer (L + k - 1), and a cached verification pass yields the next drafts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.model.heads.base import BackboneStates, HeadFamily, Rope, SharedModules
from multitoken.model.layers import Block

EXPORT_PREFIX = "mtp.parallel."
"""Export names: ``mtp.parallel.{k}.<block weights>`` (no peer format exists for these heads)."""


class ParallelHeads(HeadFamily):
    kind = "parallel"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # Cache layers L..L+D-1 belong to the extra heads' blocks.
        self.blocks = nn.ModuleList(Block(cfg, cfg.n_layers + k) for k in range(cfg.heads.depth))

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> str | None:
        if cfg.n_layers < 2:
            return f"parallel heads need a trunk: n_layers={cfg.n_layers} must be at least 2"
        if cfg.heads.depth >= cfg.n_layers:
            return (f"parallel:{cfg.heads.depth} asks for more heads than the model has layers ({cfg.n_layers}): "
                    f"use at most parallel:{cfg.n_layers - 1} or a deeper preset")
        return None

    @classmethod
    def trunk_layers(cls, cfg: ModelConfig) -> int:
        return cfg.n_layers - 1

    @classmethod
    def cache_layers(cls, cfg: ModelConfig) -> int:
        return cfg.heads.depth

    def forward(self, shared: SharedModules, states: BackboneStates, rope: Rope, cache=None, slots=None,
                mask=None) -> list[Tensor]:
        return [shared.norm(self.run(block, states.trunk, rope, cache, slots, mask)) for block in self.blocks]

    def decode_states(self, shared: SharedModules, n: int, states: BackboneStates, rope: Rope, cache, slots,
                      mask) -> list[Tensor]:
        return [shared.norm(block(states.trunk, rope, cache, slots, mask)) for block in self.blocks[:n]]

    @torch.no_grad()
    def init_from_backbone(self, shared: SharedModules, last_block: nn.Module) -> None:
        """Start every extra head as a copy of the main head (the last block)."""
        for block in self.blocks:
            block.load_state_dict(last_block.state_dict())

    def fsdp_units(self) -> Iterator[nn.Module]:
        return iter(self.blocks)

    @classmethod
    def export_name(cls, name: str, cfg: ModelConfig) -> str:
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
            return f"{EXPORT_PREFIX}{m[1]}.{m[2]}"
        return super().export_name(name, cfg)

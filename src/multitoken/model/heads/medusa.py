"""Medusa heads (Cai et al. 2024), for retrofitting a frozen pretrained model.

Head k is a stack of residual blocks ``h + SiLU(W h)`` on the final normed hidden state, then
its own vocabulary projection, initialised from the LM head. No KV cache of their own: the
verification pass yields the next drafts. Exported in Medusa's layout, ``medusa_head.{k}.{j}.*``
with the projection as the last index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model.heads.base import BackboneStates, HeadFamily, Rope, SharedModules
from multitoken.model.layers import Linear, dense

EXPORT_PREFIX = "medusa_head."


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(cfg.dim) for _ in range(cfg.heads.medusa_layers)))
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)


class MedusaHeads(HeadFamily):
    kind = "medusa"
    recompute = False  # a residual block is cheaper to keep than to recompute (see HeadFamily.run)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleList(MedusaHead(cfg) for _ in range(cfg.heads.depth))
        self._stack_cache: dict[int, tuple[list, Tensor, Tensor]] = {}
        self._unembed_cache: dict[int, list[Tensor]] = {}

    @classmethod
    def default_loss_weights(cls, depth: int) -> list[float] | None:
        return [1.0] + [0.8**k for k in range(1, depth + 1)]

    def forward(self, shared: SharedModules, states: BackboneStates, rope: Rope, cache=None, slots=None,
                mask=None) -> list[Tensor]:
        return [self.run(head.blocks, states.main) for head in self.heads]

    def decode_states(self, shared: SharedModules, n: int, states: BackboneStates, rope: Rope, cache, slots,
                      mask) -> list[Tensor] | Tensor:
        if n == 0:
            return []
        if len(self.heads[0].blocks) != 1:
            return [head.blocks(states.main) for head in self.heads[:n]]
        # The n one-block heads read the same state: one matmul for all of them instead of n, and
        # their states stay stacked (B, q, n, C) for the drafts' one gather and one batched LM head.
        # A small model's decoding step on a CPU costs its count of small ops, not its arithmetic.
        h = states.main  # (B, q, C)
        w, b = self._stacked(n)  # (n*C, C), (n*C,)
        return h[..., None, :] + F.silu(dense(h, w, b).unflatten(-1, (n, h.shape[-1])))  # (B, q, n, C)

    def _stacked(self, n: int) -> tuple[Tensor, Tensor]:
        """The first n heads' residual-block weights stacked (n*C, C) and biases (n*C,), built once
        and rebuilt when a weight moves or is written (training, loading, `.to`).

        The check runs every decoding step, so it reads the parameters it remembers (their address,
        version, dtype and device, as the key it replaced) instead of walking the modules again: slicing the ModuleList and three
        attribute lookups per head cost ~55 us a call on a CPU, a sixtieth of the demo model's
        speculative step. Parameters replaced by new objects (``load_state_dict(assign=True)``,
        which this package never calls on heads) are not noticed."""
        hit = self._stack_cache.get(n)
        if hit is None or any(p.data_ptr() != d or p._version != v or p.dtype != t or p.device != dev
                              for p, d, v, t, dev in hit[0]):
            lins = [head.blocks[0].linear for head in self.heads[:n]]
            w = torch.cat([lin.weight.detach() for lin in lins])
            b = torch.cat([lin.bias.detach() for lin in lins])
            seen = [(p, p.data_ptr(), p._version, p.dtype, p.device) for lin in lins for p in (lin.weight, lin.bias)]
            hit = self._stack_cache[n] = (seen, w, b)
        return hit[1], hit[2]

    def unembed_weights(self, shared: SharedModules, n: int) -> list[Tensor]:
        # The heads' own LM heads, looked up once per n (see `_stacked`: the same parameters, read
        # every step; `_stacked_draft_weight` still checks their address and version).
        hit = self._unembed_cache.get(n)
        if hit is None:
            hit = self._unembed_cache[n] = [self.unembed_weight(shared, j) for j in range(1, n + 1)]
        return hit

    def unembed_weight(self, shared: SharedModules, k: int) -> Tensor:
        return self.heads[k - 1].lm_head.weight

    @torch.no_grad()
    def reset_parameters(self, shared: SharedModules) -> None:
        # Zero residual branches make every head start as the main head's copy (Medusa's init).
        for head in self.heads:
            for block in head.blocks:
                nn.init.zeros_(block.linear.weight)
                nn.init.zeros_(block.linear.bias)
            head.lm_head.weight.copy_(shared.lm_head.weight)

    @torch.no_grad()
    def init_from_backbone(self, shared: SharedModules, last_block: nn.Module) -> None:
        for head in self.heads:
            head.lm_head.weight.copy_(shared.lm_head.weight)

    def fsdp_units(self) -> Iterator[nn.Module]:
        # The projections stay in the root unit: the loss reads them after forward.
        return (head.blocks for head in self.heads)

    @classmethod
    def export_name(cls, name: str, cfg: ModelConfig) -> str:
        if m := re.fullmatch(r"heads\.(\d+)\.blocks\.(\d+)\.(.+)", name):
            return f"{EXPORT_PREFIX}{m[1]}.{m[2]}.{m[3]}"
        if m := re.fullmatch(r"heads\.(\d+)\.lm_head\.weight", name):
            return f"{EXPORT_PREFIX}{m[1]}.{cfg.heads.medusa_layers}.weight"
        return super().export_name(name, cfg)

    @classmethod
    def hf_config(cls, cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
        return dict(medusa_num_heads=cfg.heads.depth, medusa_num_layers=cfg.heads.medusa_layers)

    @classmethod
    def heads_from_hf(cls, hf: dict[str, Any]) -> HeadsConfig | None:
        if not hf.get("medusa_num_heads"):
            return None
        return HeadsConfig(kind=cls.kind, depth=int(hf["medusa_num_heads"]), medusa_layers=int(hf.get("medusa_num_layers") or 1))

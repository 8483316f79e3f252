"""Sequential MTP modules (DeepSeek-V3 technical report, section 2.2).

Module k combines RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i) (embedding first, as in the
released weights), projects 2d -> d, runs one block, then its own final norm and the shared LM
head. Parameter names match the released layout (enorm, hnorm, eh_proj, block weights; ``norm``
is ``shared_head.norm``), exported as ``model.layers.{L + k}.*``. When decoding, the modules draft
one after another over committed tokens (`step`, driven by decoding/drafting.py), each with its
own KV-cache layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model.heads.base import BackboneStates, HeadFamily, Rope, SharedModules
from multitoken.model.layers import Block, RMSNorm


def shift_tokens(idx: Tensor, k: int, pad: int) -> Tensor:
    """(B, T) tokens k places ahead: out[:, i] = idx[:, i+k]; the last k columns are `pad`.

    Padded positions have no target at depth k (the loss's shift_targets ignores them), and
    attention is causal, so they never influence a position that is trained.
    """
    if k == 0:
        return idx
    return torch.cat([idx[:, k:], idx.new_full((idx.shape[0], min(k, idx.shape[1])), pad)], dim=1)[:, : idx.shape[1]]


class MTPModule(Block):
    """One DeepSeek-V3 MTP module: [enorm(emb); hnorm(h)] -> eh_proj -> block -> norm."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # released name: shared_head.norm

    def forward(self, h_prev: Tensor, emb: Tensor, rope, cache=None, slots=None, mask=None, layer=None) -> Tensor:
        """h^k (B, T, C), before the final norm, from h^{k-1} and the embeddings of t_{i+k}."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, rope, cache, slots, mask, layer)


class SequentialMTP(HeadFamily):
    kind = "sequential"
    flags = ("shared",)  # sequential:N:shared, see HeadsConfig.shared
    drafts_from_verify = False  # decoding drafts with `step`, module by module (decoding/drafting.py)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.eos_id = cfg.eos_id
        self.depth, self.first_cache_layer = cfg.heads.depth, cfg.n_layers
        # Shared (EAGLE-style): one module run at every depth; its layer index is depth 1's.
        self.layers = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(1 if cfg.heads.shared else self.depth))

    def module(self, k: int) -> MTPModule:
        """The module that computes depth k (1-based)."""
        return self.layers[min(k, len(self.layers)) - 1]

    @classmethod
    def cache_layers(cls, cfg: ModelConfig) -> int:
        return cfg.heads.depth

    @classmethod
    def default_loss_weights(cls, depth: int) -> list[float] | None:
        return None  # DeepSeek-V3: L_main + lambda / D * sum_k L^k, lambda a schedule

    def forward(self, shared: SharedModules, states: BackboneStates, rope: Rope, cache=None, slots=None,
                mask=None) -> list[Tensor]:
        if cache is not None:
            return []  # decoding feeds drafted tokens to `step` instead
        out, h = [], states.last
        for k in range(1, self.depth + 1):
            module = self.module(k)
            emb = shared.embed_tokens(shift_tokens(states.idx, k, self.eos_id))
            h = self.run(module, h, emb, rope)
            out.append(module.norm(h))
        return out

    def step(self, shared: SharedModules, k: int, h_prev: Tensor, tokens: Tensor, rope: Rope, cache=None, slots=None,
             mask=None) -> Tensor:
        """Run module k (1-based) on (B, q) positions: h^{k-1} there and the tokens t_{i+k}.

        Returns h^k before the final norm (feed it to module k+1; `draft_state` it for logits).
        """
        return self.module(k)(h_prev, shared.embed_tokens(tokens), rope, cache, slots, mask, self.first_cache_layer + k - 1)

    def draft_state(self, k: int, h: Tensor) -> Tensor:
        """Module k's final norm over its state h^k: the state its draft logits come from."""
        return self.module(k).norm(h)

    @torch.no_grad()
    def init_from_backbone(self, shared: SharedModules, last_block: nn.Module) -> None:
        """Copy the last block into each module's block and the final norm into its own norm."""
        for module in self.layers:
            module.load_state_dict(last_block.state_dict(), strict=False)
            module.norm.load_state_dict(shared.norm.state_dict())

    def fsdp_units(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    @classmethod
    def export_name(cls, name: str, cfg: ModelConfig) -> str:
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            rest = "shared_head.norm.weight" if m[2] == "norm.weight" else m[2]
            return f"model.layers.{cfg.n_layers + int(m[1])}.{rest}"
        return super().export_name(name, cfg)

    @classmethod
    def hf_config(cls, cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
        # num_mtp_layers and tie_last_hidden_states: false let transformers' generic MTP layer
        # (generate(..., use_mtp=True)) read h^0 before the final norm, as our modules do.
        D = cfg.heads.depth
        out: dict[str, Any] = dict(num_nextn_predict_layers=D, num_mtp_layers=D, tie_last_hidden_states=False)
        if "layer_types" in hf:
            out["mtp_layer_types"] = ["full_attention"] * D
        return out

    @classmethod
    def heads_from_hf(cls, hf: dict[str, Any]) -> HeadsConfig | None:
        n = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
        return HeadsConfig(kind=cls.kind, depth=n) if n else None

    @classmethod
    def export_copies(cls, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
        """DeepSeek's layout has one module per depth: a shared module is written D times."""
        if not cfg.heads.shared:
            return {}
        first = f"model.layers.{cfg.n_layers}."
        return {f"model.layers.{cfg.n_layers + k}.{n[len(first):]}": t.clone()
                for k in range(1, cfg.heads.depth) for n, t in state.items() if n.startswith(first)}

    @classmethod
    def shared_copy(cls, hf_name: str, cfg: ModelConfig) -> tuple[str, str] | None:
        """DeepSeek-style checkpoints may repeat the embedding / LM head inside each module, and a
        shared module is stored once per depth."""
        L, D = cfg.n_layers, cfg.heads.depth
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        if not m or not L <= int(m[1]) < L + D:
            return None
        if m[2] in ("embed_tokens.weight", "shared_head.head.weight"):
            return ("model.embed_tokens.weight" if m[2].startswith("embed") else "lm_head.weight",
                    "MTP modules with their own embedding or LM head are not supported")
        if cfg.heads.shared and int(m[1]) > L:
            return (f"model.layers.{L}.{m[2]}", "the config says one shared MTP module, the weights hold several "
                    "(set multitoken.heads.shared to false in config.json)")
        return None

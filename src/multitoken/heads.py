"""The three multi-token-prediction head families, behind one interface.

Each family is an ``nn.Module`` stored as ``Transformer.mtp`` with

- ``trunk_layers(config)``: how many backbone blocks run before the heads branch off;
- ``forward(model, idx, trunk, last, main, rope, cache, slots, mask)``: hidden states for
  depths 1..D, final norms applied (depth k predicts the token k+1 places ahead);
- ``unembed_weight(model, k)``: the (V, C) matrix that turns depth k's state into logits;
- ``reset_parameters(model)`` (after random init) and ``init_from_backbone(model)`` (when heads
  are added to a pretrained model).

Families:
- `ParallelHeads` (Gloeckle et al. 2024): the trunk is the first L-1 blocks; the main head is the
  model's own last block; head k is one more block on the trunk output. All share the final
  norm and the LM head.
- `SequentialMTP` (DeepSeek-V3 sec. 2.2): module k combines RMSNorm(Emb(t_{i+k})) and
  RMSNorm(h^{k-1}_i) (embedding first, as in the released weights), projects 2d -> d, runs one
  block, then its own final norm and the shared LM head. Parameter names match the released
  layout (enorm, hnorm, eh_proj, block weights; ``norm`` is ``shared_head.norm``).
- `MedusaHeads` (Cai et al. 2024): head k is residual SiLU blocks on the final normed hidden
  state and its own vocabulary projection, initialised from the LM head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.config import ModelConfig
from multitoken.model import Block, RMSNorm


def build_heads(config: ModelConfig) -> nn.Module | None:
    """The head module for ``config.heads``, or None for a plain model."""
    kind = config.heads.kind
    if kind == "none":
        return None
    return {"parallel": ParallelHeads, "sequential": SequentialMTP, "medusa": MedusaHeads}[kind](config)


def _run(heads: nn.Module, module: nn.Module, *args) -> Tensor:
    """Call one head's block; in training with ``heads.recompute`` its activations are recomputed in
    backward instead of stored, so only one head's activations are alive at a time (the role of
    Gloeckle et al.'s head-by-head backward, in a single backward pass that DDP/FSDP accept)."""
    if heads.recompute and heads.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def shift_tokens(idx: Tensor, k: int, pad: int) -> Tensor:
    """(B, T) tokens k places ahead: out[:, i] = idx[:, i+k]; the last k columns are `pad`.

    Padded positions have no target at depth k (loss.shift_targets ignores them), and attention
    is causal, so they never influence a position that is trained.
    """
    if k == 0:
        return idx
    return torch.cat([idx[:, k:], idx.new_full((idx.shape[0], min(k, idx.shape[1])), pad)], dim=1)[:, : idx.shape[1]]


class _SharedLMHead(nn.Module):
    """Defaults of the families whose depths all unembed with the model's own LM head."""

    recompute = True  # see _run
    drafts_from_verify = True
    """Decoding: the verification pass itself yields the next drafts (`decode_states`); False for
    families that draft with their own passes over committed tokens (sequential modules)."""

    def unembed_weight(self, model, k: int) -> Tensor:
        return model.lm_head.weight

    def reset_parameters(self, model) -> None:
        pass


class ParallelHeads(_SharedLMHead):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Cache layers L..L+D-1 belong to the extra heads' blocks.
        self.blocks = nn.ModuleList(Block(cfg, cfg.n_layers + k) for k in range(cfg.heads.depth))

    def trunk_layers(self, cfg: ModelConfig) -> int:
        return cfg.n_layers - 1

    def forward(self, model, *, trunk: Tensor, rope, cache=None, slots=None, mask=None, **_) -> list[Tensor]:
        return [model.norm(_run(self, block, trunk, rope, cache, slots, mask)) for block in self.blocks]

    def decode_states(self, model, n: int, *, trunk: Tensor, rope, cache, slots, mask, **_) -> list[Tensor]:
        """States (B, q, C) of the first n heads in a cached decoding pass (they draft the next step)."""
        return [model.norm(block(trunk, rope, cache, slots, mask)) for block in self.blocks[:n]]

    @torch.no_grad()
    def init_from_backbone(self, model) -> None:
        """Start every extra head as a copy of the main head (the last block)."""
        for block in self.blocks:
            block.load_state_dict(model.layers[-1].state_dict())


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


class SequentialMTP(_SharedLMHead):
    drafts_from_verify = False  # decoding drafts with `step`, module by module (decoding/drafting.py)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.depth, self.first_cache_layer = cfg.heads.depth, cfg.n_layers
        # Shared (EAGLE-style): one module run at every depth; its layer index is depth 1's.
        self.layers = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(1 if cfg.heads.shared else self.depth))

    def module(self, k: int) -> MTPModule:
        """The module that computes depth k (1-based)."""
        return self.layers[min(k, len(self.layers)) - 1]

    def trunk_layers(self, cfg: ModelConfig) -> int:
        return cfg.n_layers

    def forward(self, model, *, idx: Tensor, last: Tensor, rope, cache=None, **_) -> list[Tensor]:
        if cache is not None:
            return []  # decoding feeds drafted tokens to `step` instead
        out, h = [], last
        for k in range(1, self.depth + 1):
            module = self.module(k)
            emb = model.embed_tokens(shift_tokens(idx, k, model.config.eos_id))
            h = _run(self, module, h, emb, rope)
            out.append(module.norm(h))
        return out

    def decode_states(self, model, n: int, **_) -> list[Tensor]:
        return []

    def step(self, model, k: int, h_prev: Tensor, tokens: Tensor, rope, cache=None, slots=None, mask=None) -> Tensor:
        """Run module k (1-based) on (B, q) positions: h^{k-1} there and the tokens t_{i+k}.

        Returns h^k before the final norm (feed it to module k+1; ``module(k).norm`` it for logits).
        """
        return self.module(k)(h_prev, model.embed_tokens(tokens), rope, cache, slots, mask, self.first_cache_layer + k - 1)

    @torch.no_grad()
    def init_from_backbone(self, model) -> None:
        """Copy the last block into each module's block and the final norm into its own norm."""
        for module in self.layers:
            module.load_state_dict(model.layers[-1].state_dict(), strict=False)
            module.norm.load_state_dict(model.norm.state_dict())


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(cfg.dim) for _ in range(cfg.heads.medusa_layers)))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)


class MedusaHeads(nn.Module):
    recompute = False  # a residual block is cheaper to keep than to recompute (see _run)
    drafts_from_verify = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = nn.ModuleList(MedusaHead(cfg) for _ in range(cfg.heads.depth))

    def trunk_layers(self, cfg: ModelConfig) -> int:
        return cfg.n_layers

    def forward(self, model, *, main: Tensor, **_) -> list[Tensor]:
        return [_run(self, head.blocks, main) for head in self.heads]

    def decode_states(self, model, n: int, *, main: Tensor, **_) -> list[Tensor]:
        return [head.blocks(main) for head in self.heads[:n]]

    def unembed_weight(self, model, k: int) -> Tensor:
        return self.heads[k - 1].lm_head.weight

    @torch.no_grad()
    def reset_parameters(self, model) -> None:
        # Zero residual branches make every head start as the main head's copy (Medusa's init).
        for head in self.heads:
            for block in head.blocks:
                nn.init.zeros_(block.linear.weight)
                nn.init.zeros_(block.linear.bias)
        self.init_from_backbone(model)

    @torch.no_grad()
    def init_from_backbone(self, model) -> None:
        for head in self.heads:
            head.lm_head.weight.copy_(model.lm_head.weight)

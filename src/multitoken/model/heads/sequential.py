"""Sequential MTP modules (DeepSeek-V3 technical report, section 2.2).

Module k combines RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i) (embedding first, as in the
released weights), projects 2d -> d, runs one block, then its own final norm and the shared LM
head. Parameter names match the released layout (enorm, hnorm, eh_proj, block weights; ``norm``
is ``shared_head.norm``), exported as ``model.layers.{L + k}.*``. When decoding, the modules draft
one after another over committed tokens (`step`, driven by decoding/drafting.py), each with its
own KV-cache layer.

Training-time test (``ttt``, EAGLE-3; docs/training.md says where plain training and drafting
differ): at depth k >= 2 the module is trained on what it reads when drafting at the last
committed position: its token input is depth k-1's own argmax draft, its hidden input depth
k-1's output on that draft, while the keys and values of earlier positions come from the
teacher-forced pass (drafting rewrites them from accepted tokens). Each such depth runs its block
over two streams (`two_stream_block`): the teacher-forced one, and the draft one whose query at
position i attends to the teacher-forced keys at j < i and to its own key at i.
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
from multitoken.model.layers import Block, Linear, RMSNorm


def shift_tokens(idx: Tensor, k: int, pad: int) -> Tensor:
    """(B, T) tokens k places ahead: out[:, i] = idx[:, i+k]; the last k columns are `pad`.

    Padded positions have no target at depth k (the loss's shift_targets ignores them), and
    attention is causal, so they never influence a position that is trained.
    """
    if k == 0:
        return idx
    return torch.cat([idx[:, k:], idx.new_full((idx.shape[0], min(k, idx.shape[1])), pad)], dim=1)[:, : idx.shape[1]]


def two_stream_block(block: Block, x: Tensor, xd: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
    """`block` over the teacher-forced stream x and the draft stream xd, both (B, T, C).

    x is causal over itself (the ordinary block). The draft stream's position i attends to x's
    keys and values at j < i and to its own at i: what a drafter computes at its last position
    when the earlier positions hold accepted tokens.

    Returns:
        (block(x), the draft stream's output), each (B, T, C).
    """
    attn = block.self_attn
    B, T, _ = x.shape
    gqa = attn.n_kv_heads != attn.n_heads
    q, k, v = attn._qkv(block.input_layernorm(x), *rope)
    qd, kd, vd = attn._qkv(block.input_layernorm(xd), *rope)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    i = torch.arange(T, device=x.device)
    mask = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], dim=1)  # (T, 2T): earlier x, own xd
    yd = F.scaled_dot_product_attention(qd, torch.cat([k, kd], 2), torch.cat([v, vd], 2), attn_mask=mask,
                                        enable_gqa=gqa)
    x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
    xd = xd + attn.o_proj(yd.transpose(1, 2).reshape(B, T, -1))
    return x + block.mlp(block.post_attention_layernorm(x)), xd + block.mlp(block.post_attention_layernorm(xd))


@torch.no_grad()
def argmax_tokens(h: Tensor, w: Tensor, rows: int = 8192) -> Tensor:
    """argmax(h @ w.T) for states h (B, T, C), chunk by chunk: (B, T) long, no (B, T, V) logits."""
    flat = h.flatten(0, 1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=h.device)
    wc = w.to(h.dtype)
    for s in range(0, flat.shape[0], rows):
        out[s : s + rows] = (flat[s : s + rows] @ wc.t()).argmax(-1)
    return out.view(h.shape[:2])


class MTPModule(Block):
    """One DeepSeek-V3 MTP module: [enorm(emb); hnorm(h)] -> eh_proj -> block -> norm."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # released name: shared_head.norm

    def forward(self, h_prev: Tensor, emb: Tensor, rope, cache=None, slots=None, mask=None, layer=None,
                draft: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """h^k (B, T, C), before the final norm, from h^{k-1} and the embeddings of t_{i+k}.

        With `draft` = (h^{k-1} of the draft stream, embeddings of the drafted tokens), training
        only: (h^k, the draft stream's h^k), see `two_stream_block`.
        """
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        if draft is None:
            return super().forward(x, rope, cache, slots, mask, layer)
        xd = self.eh_proj(torch.cat([self.enorm(draft[1]), self.hnorm(draft[0])], dim=-1))
        return two_stream_block(self, x, xd, rope)


class SequentialMTP(HeadFamily):
    kind = "sequential"
    flags = ("shared",)  # sequential:N:shared, see HeadsConfig.shared
    drafts_from_verify = False  # decoding drafts with `step`, module by module (decoding/drafting.py)
    supports_ttt = True

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
        out, h, hd = [], states.last, states.last  # hd: the draft stream (training-time test)
        for k in range(1, self.depth + 1):
            module = self.module(k)
            emb = shared.embed_tokens(shift_tokens(states.idx, k, self.eos_id))
            if self.ttt and k >= 2:
                # Depth k-1's own greedy draft of t_{i+k}, as the drafter feeds it (no gradient through argmax).
                drafted = shared.embed_tokens(argmax_tokens(out[-1], self.unembed_weight(shared, k - 1)))
                h, hd = self.run(module, h, emb, rope, None, None, None, None, (hd, drafted))
                out.append(module.norm(hd))
            else:
                h = self.run(module, h, emb, rope)
                hd = h  # depth 1 reads the pending token, which is the model's own: both streams agree
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

    @torch.no_grad()
    def pass_hidden_through(self) -> None:
        """eh_proj = [0 | I]: with the released input order cat[enorm(emb), hnorm(h)] the module's
        block first reads hnorm(h) alone; the embedding half starts at zero and learns (its
        gradient, g x enorm(emb), is not zero)."""
        for module in self.layers:
            d = module.eh_proj.weight.shape[0]
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, d:].copy_(torch.eye(d))

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

"""Sequential MTP modules (DeepSeek-V3 technical report, section 2.2).

Module k combines RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i) (embedding first, as in the
released weights), projects 2d -> d, runs one block, then its own final norm and the shared LM
head. Parameter names match the released layout (enorm, hnorm, eh_proj, block weights; ``norm``
is ``shared_head.norm``), exported as ``model.layers.{L + k}.*``. When decoding, the modules draft
one after another over committed tokens (`step`, driven by decoding/drafting.py), each with its
own KV-cache layer.

Fused input (``sequential:N:fused``, EAGLE-3's fused features): depth 1's hidden input is
``fc(cat[h_a, h_b, h_c])`` (3d -> d, no bias, EAGLE-3's name) over the backbone states after the
blocks named by ``HeadsConfig.fused_layers`` (by default 2, L/2 and L: a low, a middle and the top
state h^0), in place of h^0; hnorm then applies as before, and deeper depths read the previous
depth's state as before. ``fc`` starts as [0 | 0 | I], so fused heads begin as ordinary ones (and
take an ordinary heads file as a warm start); while decoding, the drafter records fc's output per
position where it recorded h^0 (`hidden_input`).

Training-time test (``ttt``; docs/training.md has the table of what each depth reads): at depth
k >= 2 the module is trained on exactly what `ModuleDrafter` computes at the last committed
position with greedy drafts, drafted tokens included. Drafting from anchor a, depth k at the
window positions a-m, m = 0..k-2, reads a drafted token (draft k-1-m of anchor a) and depth k-1's
output at a-m; positions a-m with m >= k-1 read committed tokens only. So each such depth runs its
block over k streams at once (`stream_block`): the teacher-forced one, and draft streams
m = 0..k-2, stream m at position p standing for anchor p+m; stream 0 is what the loss and
evaluation see. (EAGLE-3's training-time test feeds the draft its own features with the true
tokens, which plain teacher forcing of these modules already does; measured at CPU scale, the
drafted tokens of ``ttt`` cost acceptance.)
"""

from __future__ import annotations

import dataclasses
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


def stream_mask(streams: int, T: int, device: torch.device | str | None = None) -> Tensor:
    """(S*T, (S+1)*T) bool: which keys the draft streams' queries see (`stream_block`).

    Rows are draft stream m's position p (m-major); columns the teacher-forced keys, then each
    draft stream's. Query (m, p) stands for anchor a = p+m at window position p; drafting from a,
    the module at p' <= p read committed inputs only where a - p' >= S (`p' <= p - (S - m)`, the
    teacher-forced key), and drafted ones at p' = a - s for s = m..S-1 (draft stream s's key).
    """
    p = torch.arange(T, device=device)
    m = torch.arange(streams, device=device)
    tf = p[None, None, :] <= p[None, :, None] - (streams - m)[:, None, None]  # (S, T, T)
    ds = m[None, :] - m[:, None]  # (S_query, S_key): s - m
    own = (ds[:, None, :, None] == (p[:, None] - p[None, :])[None, :, None, :]) & (ds >= 0)[:, None, :, None]  # (S, T, S, T)
    return torch.cat([tf, own.reshape(streams, T, streams * T)], -1).reshape(streams * T, (streams + 1) * T)


def stream_block(block: Block, x: Tensor, xds: list[Tensor], rope: Rope) -> tuple[Tensor, list[Tensor]]:
    """`block` over the teacher-forced stream x and S draft streams xds, each (B, T, C).

    x is causal over itself (the ordinary block). Draft stream m's position p attends as the
    drafter's module does at window position p when drafting from anchor p+m (`stream_mask`):
    the teacher-forced keys at p' <= p-(S-m), draft stream s's key at p-(s-m) for s = m..S-1
    (its own at p included). Norms, RoPE, attention scale and sandwich norms are the block's own.

    Returns:
        (block(x), [draft stream m's output] for m = 0..S-1), each (B, T, C).
    """
    attn = block.self_attn
    B, T, _ = x.shape
    S = len(xds)
    gqa = attn.n_kv_heads != attn.n_heads
    xs = torch.cat([x, *xds], 1)  # (B, (S+1)T, C): every stream through one matmul per projection
    cos, sin = (r.repeat(1, 1, S + 1, 1) for r in block._rope(rope))  # each stream at positions 0..T-1
    q, k, v = attn._qkv(block.input_layernorm(xs), cos, sin)  # (B, H|Hkv, (S+1)T, Dh)
    y = F.scaled_dot_product_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], is_causal=True, enable_gqa=gqa,
                                       scale=attn.scale)
    yd = F.scaled_dot_product_attention(q[:, :, T:], k, v, attn_mask=stream_mask(S, T, x.device), enable_gqa=gqa,
                                        scale=attn.scale)
    a = attn.o_proj(torch.cat([y, yd], 2).transpose(1, 2).reshape(B, (S + 1) * T, -1))
    out = block._mlp(block._residual_attn(xs, a))
    return out[:, :T], list(out[:, T:].split(T, 1))


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
                streams: list[tuple[Tensor, Tensor]] | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """h^k (B, T, C), before the final norm, from h^{k-1} and the embeddings of t_{i+k}.

        With `streams` = [(h^{k-1}, token embeddings) of draft stream m], training only: (h^k,
        [draft stream m's h^k]), see `stream_block`.
        """
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        if streams is None:
            return super().forward(x, rope, cache, slots, mask, layer)
        xds = [self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1)) for h, e in streams]
        return stream_block(self, x, xds, rope)


class SequentialMTP(HeadFamily):
    kind = "sequential"
    flags = ("shared", "fused")  # sequential:N[:shared][:fused], see HeadsConfig.shared and .fused
    drafts_from_verify = False  # decoding drafts with `step`, module by module (decoding/drafting.py)
    supports_ttt = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.eos_id = cfg.eos_id
        self.heads_config = cfg.heads
        self.depth, self.first_cache_layer = cfg.heads.depth, cfg.n_layers
        # Shared (EAGLE-style): one module run at every depth; its layer index is depth 1's.
        self.layers = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(1 if cfg.heads.shared else self.depth))
        # Fused input (EAGLE-3's fc): depth 1 reads fc(cat[states after fused_layers blocks]) instead of h^0.
        self.fused_layers = tuple(cfg.heads.fused_layers) if cfg.heads.fused else ()
        self.fc = nn.Linear(len(self.fused_layers) * cfg.dim, cfg.dim, bias=False) if self.fused_layers else None

    def module(self, k: int) -> MTPModule:
        """The module that computes depth k (1-based)."""
        return self.layers[min(k, len(self.layers)) - 1]

    @classmethod
    def tapped_layers(cls, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(cfg.heads.fused_layers) if cfg.heads.fused else ()

    @classmethod
    def cache_layers(cls, cfg: ModelConfig) -> int:
        return cfg.heads.depth

    def hidden_input(self, states: BackboneStates) -> Tensor:
        """Depth 1's hidden input (B, T, C): h^0, or with fused heads fc over the tapped states."""
        if self.fc is None:
            return states.last
        return self.fc(torch.cat([states.taps[i] for i in self.fused_layers], dim=-1))  # (B, T, n*C) -> (B, T, C)

    @classmethod
    def default_loss_weights(cls, depth: int) -> list[float] | None:
        return None  # DeepSeek-V3: L_main + lambda / D * sum_k L^k, lambda a schedule

    def forward(self, shared: SharedModules, states: BackboneStates, rope: Rope, cache=None, slots=None,
                mask=None) -> list[Tensor]:
        if cache is not None:
            return []  # decoding feeds drafted tokens to `step` instead
        out, h = [], self.hidden_input(states)
        drafts: list[Tensor] = []  # drafts[d-1]: depth d's greedy draft at each anchor position (B, T)
        streams: list[Tensor] = []  # depth k-1's draft streams (training-time test; `stream_block`)
        for k in range(1, self.depth + 1):
            module = self.module(k)
            emb = shared.embed_tokens(shift_tokens(states.idx, k, self.eos_id))
            if self.ttt and k >= 2:
                drafts.append(self.greedy_drafts(shared, k - 1, out[-1]))  # no gradient through argmax
                # Stream m (anchor p+m) reads depth k-1's stream m (its teacher-forced state for the
                # last one) and draft k-1-m of its anchor.
                ins = [(streams[m] if m < k - 2 else h, shared.embed_tokens(shift_tokens(drafts[k - 2 - m], m, self.eos_id)))
                       for m in range(k - 1)]
                h, streams = self.run(module, h, emb, rope, None, None, None, None, ins)
                out.append(module.norm(streams[0]))
            else:
                h = self.run(module, h, emb, rope)  # depth 1 reads the pending token, the model's own
                out.append(module.norm(h))
        return out

    def greedy_drafts(self, shared: SharedModules, k: int, h: Tensor) -> Tensor:
        """Depth k's greedy drafts (B, T) from its normed states h (B, T, C), over the draft
        vocabulary when one is set (as `draft_logits`)."""
        w, ids = self.unembed_weight(shared, k), self.draft_ids
        if ids is None:
            return argmax_tokens(h, w)
        return ids[argmax_tokens(h, self._draft_weight(k, w))]

    def step(self, shared: SharedModules, k: int, h_prev: Tensor, tokens: Tensor, rope: Rope, cache=None, slots=None,
             mask=None) -> Tensor:
        """Run module k (1-based) on (B, q) positions: h^{k-1} there and the tokens t_{i+k}.

        Returns h^k before the final norm (feed it to module k+1; `draft_state` it for logits).
        """
        return self.module(k)(h_prev, shared.embed_tokens(tokens), rope, cache, slots, mask, self.first_cache_layer + k - 1)

    def draft_state(self, k: int, h: Tensor) -> Tensor:
        """Module k's final norm over its state h^k: the state its draft logits come from."""
        return self.module(k).norm(h)

    def reset_parameters(self, shared: SharedModules) -> None:
        self.pass_fused_through()

    @torch.no_grad()
    def pass_fused_through(self) -> None:
        """fc = [0 | ... | 0 | I]: the fused input starts as h^0 (the last of `fused_layers`), so the
        heads compute what ordinary ones compute; the zero parts learn (their gradient, g x h_a, is not zero)."""
        if self.fc is not None:
            d = self.fc.weight.shape[0]
            self.fc.weight.zero_()
            self.fc.weight[:, -d:].copy_(torch.eye(d))

    @torch.no_grad()
    def init_from_backbone(self, shared: SharedModules, last_block: nn.Module) -> None:
        """Copy the last block into each module's block and the final norm into its own norm; a
        fused input starts as h^0."""
        for module in self.layers:
            module.load_state_dict(last_block.state_dict(), strict=False)
            module.norm.load_state_dict(shared.norm.state_dict())
        self.pass_fused_through()

    def warm_start_from(self, heads: HeadsConfig) -> tuple[set[str], str] | None:
        """Fused heads take the weights of the same heads without the fused input; fc starts as h^0."""
        mine = self.heads_config
        if not mine.fused or heads != dataclasses.replace(mine, fused=False, fused_layers=[]):
            return None
        self.pass_fused_through()
        return {"fc.weight"}, (f"{heads} weights copied into {mine} heads; fc (states after blocks "
                               f"{', '.join(map(str, self.fused_layers))}) starts as h^0 alone: zero on the others, "
                               f"the identity on block {self.fused_layers[-1]}'s")

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
    def hf_export_problem(cls, cfg: ModelConfig) -> str | None:
        if cfg.heads.fused:
            return (f"{cfg.heads} heads read fused backbone states through fc, which DeepSeek's and transformers' MTP "
                    "layout has no place for (its layer reads h^0 alone): ship them as a heads file (save_heads) or "
                    "a run directory and decode with multitoken (generate, serve), or train heads without :fused to export")
        return None

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

    SPECULATORS_NAMES = {"enorm": "token_layernorm", "hnorm": "hidden_layernorm", "eh_proj": "input_proj",
                         "norm": "final_layernorm"}
    """Our module's own parts -> speculators' MTP layer (``MTPLayerMixin``); the block's names are shared."""

    @classmethod
    def speculators_layout(cls, cfg: ModelConfig) -> tuple[str, dict[str, str]] | str:
        """speculators' ``mtp`` type holds one such layer (`num_nextn_predict_layers` must be 1),
        with our input order ``input_proj(cat[token_layernorm(emb), hidden_layernorm(h)])``: module 1
        maps key for key. What it computes equals our depth 1 only; at later steps speculators
        feeds the layer its previous output after ``final_layernorm``, ours before its norm, so
        deeper drafts differ (io/speculators.py exports one draft token per step). Fused heads are
        refused: ``mtp`` reads the verifier's last state alone, and ``eagle3``, which has an ``fc``,
        runs another layer than ours (io/speculators.py)."""
        if cfg.heads.fused:
            return (f"{cfg.heads} heads map onto no speculators model type: its mtp layer reads the verifier's last "
                    "hidden state alone, and eagle3 (which fuses layers through fc) runs another layer than our module: "
                    "serve them with `multitoken serve`, or export heads trained without :fused")
        with torch.device("meta"):
            names = list(MTPModule(cfg, cfg.n_layers).state_dict())
        out = {}
        for n in names:
            head, _, rest = n.partition(".")
            out[f"layers.0.{n}"] = f"mtp_layers.0.{cls.SPECULATORS_NAMES.get(head, head)}.{rest}"
        return "mtp", out

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

"""The native decoder: a Llama-family transformer with optional multi-token-prediction heads.

Parameter names follow Hugging Face's Llama layout one to one (``embed_tokens``, ``layers.{i}.
self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``), minus the
``model.`` prefix, so Llama / Qwen2 / Mistral / SmolLM2 checkpoints map onto it by renaming
alone. MTP heads live under ``mtp.`` (see heads.py).

`forward` returns one hidden state per depth, ``[main, d1, ..., dD]``, each already passed
through its final norm; `unembed_weight(depth)` gives the matrix that turns it into logits. The
loss (loss.py) never needs the logits of all depths at once. The code is single-device and knows
nothing of DDP, FSDP or torch.compile; parallel.py wraps it from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale in the input dtype, as Hugging Face's Llama does (parity).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """(S, Dh) cos and sin for the half-split ("rotate_half") RoPE convention of Hugging Face."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, Dh)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, Dh) by per-token angles cos/sin (B, 1, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Causal self-attention over x (B, T, C) alone (training, evaluation)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def cached(self, x: Tensor, cos: Tensor, sin: Tensor, kl: Tensor, vl: Tensor, rows: Tensor, slots: Tensor,
               bias: Tensor) -> Tensor:
        """Attention for new tokens x (B, q, C) against one block's cache buffers.

        Args:
            kl, vl: (B, Hkv, S, Dh) this block's keys and values; the new ones are written at `slots`.
            rows: (B, 1) row indices; slots: (B, q) where each row's new tokens go.
            bias: (B, 1, rep*q, live) additive mask over the first `live` slots, query heads folded
                (`KVCache.attention_bias`): 0 where a token may look, -inf elsewhere.
        """
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        # Advanced indices separated by a slice put the indexed dims first: (B, q, Hkv, Dh).
        kl[rows, :, slots] = k.transpose(1, 2).to(kl.dtype)
        vl[rows, :, slots] = v.transpose(1, 2).to(vl.dtype)
        live = bias.shape[-1]
        # Decoding feeds few tokens: fold the query heads that share a KV head into the query
        # length, (B, Hkv, rep*q, Dh), so every kernel sees plain multi-head attention and no KV
        # head is copied (head h reads KV head h // rep, as Hugging Face's repeat_kv does).
        qf = q.reshape(B, self.n_kv_heads, -1, self.head_dim)
        y = F.scaled_dot_product_attention(qf, kl[:, :, :live].to(q.dtype), vl[:, :, :live].to(q.dtype), attn_mask=bias)
        y = y.reshape(B, self.n_heads, T, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; `layer` is its index into the KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None, layer: int | None = None) -> Tensor:
        """`layer` overrides the cache layer (a shared MTP module runs once per depth, each its own)."""
        if cache is not None:
            layer = self.layer if layer is None else layer
            # The decoding runner may swap in a compiled `cached` (one compilation serves every block).
            fn = cache.block_fn or Block.cached
            bias = cache.attention_bias(mask, self.self_attn.n_heads // self.self_attn.n_kv_heads, x.dtype)
            return fn(self, x, rope[0], rope[1], cache.k[layer], cache.v[layer], cache._rows, slots, bias)
        x = x + self.self_attn(self.input_layernorm(x), *rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x: Tensor, cos: Tensor, sin: Tensor, kl: Tensor, vl: Tensor, rows: Tensor, slots: Tensor,
               bias: Tensor) -> Tensor:
        """The block over new tokens x (B, q, C) with this block's cache buffers (see `Attention.cached`)."""
        x = x + self.self_attn.cached(self.input_layernorm(x), cos, sin, kl, vl, rows, slots, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Llama-family decoder plus the MTP heads named by ``config.heads``.

    Args:
        config: the model's shape and heads.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from multitoken.heads import build_heads  # heads.py builds on the blocks above

        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = build_heads(config)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    # ---- construction -------------------------------------------------------------------
    def init_weights(self) -> None:
        """Llama-style init: N(0, 0.02), output projections scaled by 1/sqrt(2L), norms at 1."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        if self.mtp is not None:
            self.mtp.reset_parameters(self)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute the RoPE tables (after ``to_empty`` from the meta device, say)."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the main model (everything but the MTP heads)."""
        return [p for n, p in self.named_parameters() if not n.startswith("mtp.")]

    def freeze_backbone(self) -> None:
        """Train the MTP heads only (Medusa-1 style); shared norm and LM head stay frozen too."""
        if self.mtp is None:
            from multitoken.errors import UserError
            raise UserError("--freeze-backbone leaves nothing to train: the model has no MTP heads (add --heads KIND:N)")
        for p in self.backbone_parameters():
            p.requires_grad_(False)

    def missing_weights(self, missing_keys: list[str], heads: bool = True) -> list[str]:
        """The keys of a non-strict ``load_state_dict`` that are really missing: a tied LM head is the
        embedding, not a weight of its own; with heads=False the MTP heads may be absent too."""
        return [k for k in missing_keys if not (self.config.tie_embeddings and k == "lm_head.weight")
                and (heads or not k.startswith("mtp."))]

    def num_parameters(self, heads: bool = True) -> int:
        params = {id(p): p for n, p in self.named_parameters() if heads or not n.startswith("mtp.")}
        return sum(p.numel() for p in params.values())

    @property
    def depth(self) -> int:
        """Extra future tokens the heads predict (0 without heads)."""
        return self.config.heads.depth if self.mtp is not None else 0

    # ---- pieces that decoding reuses ------------------------------------------------------
    def rope(self, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Angles for positions (B, T) or (T,), shaped to broadcast over heads: (B|1, 1, T, Dh)."""
        if input_pos.dim() == 1:
            input_pos = input_pos[None]
        return self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None]

    def run_layers(self, x: Tensor, start: int, end: int, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                   slots: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Apply backbone blocks start..end-1 to hidden states x (B, T, C)."""
        for block in self.layers[start:end]:
            x = block(x, rope, cache, slots, mask)
        return x

    def unembed_weight(self, depth: int = 0) -> Tensor:
        """(V, C) matrix turning depth `depth`'s hidden state into logits."""
        if depth == 0 or self.mtp is None:
            return self.lm_head.weight
        return self.mtp.unembed_weight(self, depth)

    def logits(self, h: Tensor, depth: int = 0) -> Tensor:
        """Logits (..., V) for hidden states of depth `depth` as `forward` returns them."""
        return F.linear(h, self.unembed_weight(depth))

    # ---- forward --------------------------------------------------------------------------
    def forward(self, idx: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None, heads: bool = True) -> list[Tensor]:
        """Hidden states per depth, final norms applied.

        Args:
            idx: (B, T) token ids.
            cache: a KVCache for incremental decoding; None for a full causal pass (training).
            input_pos: (B, T) RoPE positions; default: the cache's next positions, or 0..T-1.
            slots: (B, T) cache slots to write; default ``input_pos`` (trees pass scratch slots).
            mask: (B, T, S) which cache slots each token attends; default causal over slots.
            heads: also run the MTP heads. With a cache, sequential modules are not run here
                (their inputs are drafted tokens): speculative decoding drives them step by step.
        Returns:
            ``[main, d1, ..., dD]``, each (B, T, C); only ``[main]`` when heads are off or absent.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.max_seq_len:
                from multitoken.errors import UserError
                raise UserError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}: shorten it or raise max_seq_len")
            pos = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        else:
            pos = input_pos if input_pos is not None else cache.positions(T)
            slots = pos if slots is None else slots
            mask = cache.causal_mask(slots) if mask is None else mask
        rope = self.rope(pos)
        x = self.embed_tokens(idx)  # (B, T, C)
        run_heads = heads and self.mtp is not None
        cut = self.mtp.trunk_layers(self.config) if run_heads else self.config.n_layers
        trunk = self.run_layers(x, 0, cut, rope, cache, slots, mask)
        last = self.run_layers(trunk, cut, self.config.n_layers, rope, cache, slots, mask)
        out = [self.norm(last)]
        if run_heads:
            out += self.mtp(self, idx=idx, trunk=trunk, last=last, main=out[0], rope=rope,
                            cache=cache, slots=slots, mask=mask)
        return out

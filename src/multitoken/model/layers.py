"""The transformer's building blocks: RMSNorm, RoPE, attention, SwiGLU MLP and the pre-norm block.

Parameter names follow Hugging Face's Llama layout one to one (``self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ...), so Llama-family checkpoints map by renaming alone.
Every block also has a cached path (`Block.cached`) that writes its keys and values into its own
layer of a static `KVCache`.

Decoding fuses projections (`fuse_projections`): q/k/v and gate/up each become one matmul over
one weight, while the parameters keep their names and shapes as views into it, so checkpoints,
exports and in-place updates are unchanged. Without gradients a fused module uses the fused
weight; training uses the parameters one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.model.kv_cache import KVCache


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


class Fusable(nn.Module):
    """A module whose sibling projections `FUSED` can run as one matmul (see the module docstring)."""

    FUSED: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._fused: tuple[Tensor, Tensor | None] | None = None

    def fuse(self) -> None:
        """Store the projections' weights (and biases) one after another in one tensor each; the
        parameters become views into them (same objects, names, values)."""
        lins = [getattr(self, n) for n in self.FUSED]
        w = torch.cat([lin.weight.detach() for lin in lins])
        b = torch.cat([lin.bias.detach() for lin in lins]) if lins[0].bias is not None else None
        row = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data = w[row : row + n]
            if b is not None:
                lin.bias.data = b[row : row + n]
            row += n
        self._fused = (w, b)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .half(), to_empty(): the parameters get new tensors, so fuse them again.
        out = super()._apply(fn, recurse)
        if self._fused is not None:
            self.fuse()
        return out

    def project(self, x: Tensor) -> list[Tensor]:
        """Each projection of x, through the fused weight when no gradient is needed."""
        lins = [getattr(self, n) for n in self.FUSED]
        if self._fused is None or (torch.is_grad_enabled() and lins[0].weight.requires_grad):
            return [lin(x) for lin in lins]
        w, b = self._fused
        return list(F.linear(x, w, b).split([lin.weight.shape[0] for lin in lins], dim=-1))


def fuse_projections(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every block in `model` (for decoding; idempotent)."""
    for m in model.modules():
        if isinstance(m, Fusable) and m._fused is None:
            m.fuse()


class Attention(Fusable):
    FUSED = ("q_proj", "k_proj", "v_proj")

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
        q, k, v = self.project(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
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


class MLP(Fusable):
    FUSED = ("gate_proj", "up_proj")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


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

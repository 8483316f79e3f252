"""The transformer's building blocks: RMSNorm, RoPE, attention, gated MLP and the pre-norm block.

Parameter names follow Hugging Face's Llama layout one to one (``self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ...), so Llama-family checkpoints map by renaming alone.
The variants of newer families are config switches, named as transformers names their weights:
Qwen3's and Gemma-3's ``self_attn.{q,k}_norm``, Gemma's (1 + w) RMSNorm, its GeGLU MLP and its
``pre_/post_feedforward_layernorm``, and Llama-3.1's RoPE scaling (`rope_tables`).
Every block also has a cached path (`Block.cached`) that writes its keys and values into its own
layer of a static `KVCache`.

Decoding fuses projections (`fuse_projections`): q/k/v and gate/up each become one matmul over
one weight, while the parameters keep their names and shapes as views into it, so checkpoints,
exports and in-place updates are unchanged. Without gradients a fused module uses the fused
weight; training uses the parameters one by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.config import ModelConfig, RopeScaling
from multitoken.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm; with `plus_one` Gemma's form, which scales by (1 + weight) and keeps weight at 0."""

    def __init__(self, dim: int, eps: float = 1e-5, plus_one: bool = False) -> None:
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            # Gemma scales in float32 and casts after ((x * w).to(dtype)), Llama the other way round.
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        # Normalise in float32 and scale in the input dtype, as Hugging Face's Llama does (parity).
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        """The identity scale: 1, or 0 for the (1 + weight) form."""
        nn.init.zeros_(self.weight) if self.plus_one else nn.init.ones_(self.weight)


class ScaledEmbedding(nn.Embedding):
    """Token embedding times `scale` in the weight's dtype (Gemma's sqrt(dim)); a tied LM head reads
    the unscaled matrix, as in Gemma."""

    def __init__(self, num: int, dim: int, scale: float = 1.0) -> None:
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, idx: Tensor) -> Tensor:
        out = super().forward(idx)
        if self.scale == 1.0:
            return out
        return out * torch.tensor(self.scale, dtype=self.weight.dtype, device=out.device)


def _scaled_inv_freq(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Frequencies under `s`, as transformers' ``linear`` and ``llama3`` rope types compute them."""
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind != "llama3":
        return inv_freq
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    # Between the two wavelengths, blend the scaled and the original frequency.
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """(S, Dh) cos and sin for the half-split ("rotate_half") RoPE convention of Hugging Face."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = _scaled_inv_freq(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, Dh)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, Dh) by per-token angles cos/sin (B, 1, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


DENSE_MIN = 1 << 18
"""Weights of at least this many elements (1 MB in float32) take `dense`'s oneDNN path on the CPU;
below it a oneDNN call's fixed cost (~50 us here) is more than the whole MKL matmul."""
_ONEDNN: list[bool] = []  # [available], decided at the first call


def dense(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``; on the CPU, without gradients, for a large float32 weight and more
    than one row, oneDNN's matmul over a copy of w packed once (kept on w, packed again when w is
    written or moved).

    Why: MKL's float32 matmul of a few rows costs up to ~4x its one-row matmul on the AMD CPU this
    project measures on (it is compute, not the weight's memory traffic, that grows), so verifying
    k+1 tokens cost several plain steps; oneDNN over the packed weight costs little more for 5
    rows than for 1 (bench/results/cpu_steps_smollm2.json). One row keeps MKL's matrix-vector
    product: as fast or faster there, and plain decoding stays what it was. Rounding: a row's
    result differs from MKL's one-row result by float32 rounding (as MKL's own results for 1, 2-3
    and 4+ rows already differ from each other); the rows of one oneDNN call are bit-identical
    to each other's whatever their number (packed for 8 rows; checked from 2 to 300 rows, 1 and 2
    threads). Training keeps F.linear (this packed path has no backward), and so does code that
    torch.compile traces (compiled CPU decoding): the packed copy is looked up by the weight's
    address, which dynamo cannot trace, and the whole compiled block would fall back to eager.
    """
    if (x.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32 or w.numel() < DENSE_MIN
            or x.numel() == x.shape[-1] or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or torch.compiler.is_compiling() or not _onednn()):
        return F.linear(x, w, b)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), _packed(w), b, "none", [], "")
    return y.view(*x.shape[:-1], w.shape[0])


def _onednn() -> bool:
    if not _ONEDNN:
        ops = torch.ops.mkldnn
        _ONEDNN.append(bool(torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                            and hasattr(ops, "_reorder_linear_weight")))
    return _ONEDNN[0]


def _packed(w: Tensor) -> Tensor:
    """w in oneDNN's blocked layout for up to 8 rows, made once and kept on w (an attribute), made
    again when w moves or is written in place (its address or version changes)."""
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = getattr(w, "_onednn_packed", None)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8))
        w._onednn_packed = hit
    return hit[1]


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward is `dense`."""

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight, self.bias)


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
        return list(dense(x, w, b).split([lin.weight.shape[0] for lin in lins], dim=-1))


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
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.scale = cfg.attn_scale or None  # None: SDPA's own 1/sqrt(head_dim)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Causal self-attention over x (B, T, C) alone (training, evaluation)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # per head, before RoPE (Qwen3, Gemma-3)
            q, k = self.q_norm(q), self.k_norm(k)
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
        y = F.scaled_dot_product_attention(qf, kl[:, :, :live].to(q.dtype), vl[:, :, :live].to(q.dtype), attn_mask=bias,
                                           scale=self.scale)
        y = y.reshape(B, self.n_heads, T, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(Fusable):
    """Gated MLP: SwiGLU, or GeGLU with tanh-approximated GELU (Gemma's gelu_pytorch_tanh)."""

    FUSED = ("gate_proj", "up_proj")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gelu = cfg.hidden_act == "gelu_tanh"
        self.gate_proj = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.project(x)
        return self.down_proj((F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up)


class Block(nn.Module):
    """Pre-norm transformer block; `layer` is its index into the KV cache.

    A block of a local (sliding-window) layer takes the second pair of RoPE tables when the model
    passes two (`Transformer.rope`); with `sandwich_norms` the attention and MLP outputs are
    normalised before they join the residual stream (Gemma-3).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.local = layer in cfg.local_layers
        eps, one = cfg.norm_eps, cfg.norm_plus_one
        self.input_layernorm = RMSNorm(cfg.dim, eps, one)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps, one)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, eps, one)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, eps, one)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None, layer: int | None = None) -> Tensor:
        """`layer` overrides the cache layer (a shared MTP module runs once per depth, each its own)."""
        if cache is not None:
            layer = self.layer if layer is None else layer
            # The decoding runner may swap in a compiled `cached` (one compilation serves every block).
            fn = cache.block_fn or Block.cached
            bias = cache.attention_bias(mask, self.self_attn.n_heads // self.self_attn.n_kv_heads, x.dtype)
            cos, sin = self._rope(rope)
            return fn(self, x, cos, sin, cache.k[layer], cache.v[layer], cache._rows, slots, bias)
        return self._mlp(self._residual_attn(x, self.self_attn(self.input_layernorm(x), *self._rope(rope))))

    def _rope(self, rope: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return (rope[2], rope[3]) if self.local and len(rope) == 4 else (rope[0], rope[1])

    def _residual_attn(self, x: Tensor, attn: Tensor) -> Tensor:
        return x + (self.post_attention_layernorm(attn) if self.sandwich else attn)

    def _mlp(self, x: Tensor) -> Tensor:
        if self.sandwich:
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x: Tensor, cos: Tensor, sin: Tensor, kl: Tensor, vl: Tensor, rows: Tensor, slots: Tensor,
               bias: Tensor) -> Tensor:
        """The block over new tokens x (B, q, C) with this block's cache buffers (see `Attention.cached`)."""
        attn = self.self_attn.cached(self.input_layernorm(x), cos, sin, kl, vl, rows, slots, bias)
        return self._mlp(self._residual_attn(x, attn))

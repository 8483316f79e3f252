"""The reference line of ``bench decode``: a minimal decoder compiled as one whole model.

How fast plain decoding can be on this machine with PyTorch alone: the same weights (shared with
our model, not copied), a static KV cache of `slots` positions kept as module buffers, one
function for a decoding step that torch.compile captures whole (``mode="reduce-overhead"``: CUDA
graphs), gpt-fast style. No heads, no drafting, no live-slot buckets, no emitter: every step
attends over all `slots` slots with a mask. Our plain decoding should beat it (issue 23: the
H200 measured 938 tokens/s for it against our 618-654).

On the CPU (tests, smoke runs) it runs eagerly with ``compile=False``; greedy output equals our
plain decoding in float32, which the benchmark reports as its token match.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_SLOTS = 2048


def _norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


class MinimalDecoder(nn.Module):
    """Plain decoding of a `Transformer`'s backbone over a static cache of `slots` positions.

    Args:
        model: the model whose weights it uses (heads ignored).
        batch_size: rows.
        slots: cache positions (prompt plus new tokens must fit).
        compile: torch.compile the step with mode="reduce-overhead" (CUDA graphs on CUDA).
    """

    def __init__(self, model, batch_size: int, slots: int = DEFAULT_SLOTS, compile: bool = False) -> None:
        super().__init__()
        cfg = model.config
        p = next(model.parameters())
        self.cfg, self.model, self.slots = cfg, model, min(slots, cfg.max_seq_len)
        L, B, S = cfg.n_layers, batch_size, self.slots
        self.register_buffer("k", torch.zeros(L, B, cfg.n_kv_heads, S, cfg.head_dim, dtype=p.dtype, device=p.device))
        self.register_buffer("v", torch.zeros_like(self.k))
        self.register_buffer("cos", model.rope_cos[:S].to(p.device))
        self.register_buffer("sin", model.rope_sin[:S].to(p.device))
        self.register_buffer("ar", torch.arange(S, device=p.device))
        self.step_fn = torch.compile(self.step, mode="reduce-overhead", fullgraph=True) if compile else self.step
        self.compiled = compile

    def forward_tokens(self, idx: Tensor, pos: Tensor) -> Tensor:
        """Logits (B, T, V) of tokens idx (B, T) at positions pos (B, T), writing the cache."""
        cfg, m = self.cfg, self.model
        B, T = idx.shape
        H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, T, Dh)
        mask = self.ar[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, S)
        rows = torch.arange(B, device=idx.device)[:, None]
        x = m.embed_tokens(idx)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = _norm(x, layer.input_layernorm.weight, cfg.norm_eps)
            q = _rope(a.q_proj(h).view(B, T, H, Dh).transpose(1, 2), cos, sin)
            k = _rope(a.k_proj(h).view(B, T, Hkv, Dh).transpose(1, 2), cos, sin)
            v = a.v_proj(h).view(B, T, Hkv, Dh).transpose(1, 2)
            self.k[i][rows, :, pos] = k.transpose(1, 2)
            self.v[i][rows, :, pos] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=H != Hkv)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))
            h = _norm(x, layer.post_attention_layernorm.weight, cfg.norm_eps)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        return m.lm_head(_norm(x, m.norm.weight, cfg.norm_eps))

    def step(self, tok: Tensor, pos: Tensor) -> Tensor:
        """One decoding step: logits (B, V) after tokens tok (B,) at positions pos (B,)."""
        return self.forward_tokens(tok[:, None], pos[:, None])[:, 0]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Greedy (or plain sampling) continuations of `new_tokens` tokens per prompt (no EOS)."""
        dev = self.k.device
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        if int(lengths.max()) + new_tokens > self.slots:
            raise ValueError(f"prompt plus {new_tokens} tokens exceed the reference decoder's {self.slots} slots")
        idx = torch.zeros(B, int(lengths.max()), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            idx[b, : len(p)] = torch.tensor(p, device=dev)
        pos = torch.arange(idx.shape[1], device=dev).expand(B, -1)
        logits = self.forward_tokens(idx, pos).gather(1, (lengths - 1)[:, None, None].expand(-1, 1, self.cfg.vocab_size))[:, 0]
        out = torch.zeros(B, new_tokens, dtype=torch.long, device=dev)
        pos = lengths.clone()
        for t in range(new_tokens):
            tok = self._pick(logits, temperature, generator)
            out[:, t] = tok
            if t == new_tokens - 1:
                break
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.step_fn(tok, pos).clone()
            pos += 1
        return out.tolist()

    @staticmethod
    def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=generator)[:, 0]


def draft_cost(model, batch_size: int, reps: int = 20) -> dict[int, float]:
    """Seconds per `draft_logits` call of each depth at `batch_size` rows (the draft's LM-head share)."""
    if model.mtp is None:
        return {}
    p = next(model.parameters())
    h = torch.randn(batch_size, model.config.dim, device=p.device, dtype=p.dtype)
    out = {}
    with torch.no_grad():
        for k in range(1, model.depth + 1):
            model.mtp.draft_logits(model.shared, k, h)  # warm-up (and the sliced weight)
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                model.mtp.draft_logits(model.shared, k, h)
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            out[k] = (time.perf_counter() - t0) / reps
    return out

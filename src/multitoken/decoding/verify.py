"""Verification: which drafted tokens the main head accepts, and the token it emits after them.

Rules (docs/decoding.md has the proofs):
- greedy: accept draft j while it equals the main argmax at j-1; output == plain greedy;
- lossless sampling (Leviathan et al. / Chen et al.): accept draft j with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from normalise(max(0, p_j - q_j));
  when all pass, draw the bonus from p_{k+1}. p and q go through the same warping;
- LOSSY typical acceptance (Medusa): accept while p(d_j) > min(eps, delta * exp(-H(p)));
- trees: one target token per node (argmax, or one draw from p: children of a node carry
  distinct tokens, so following the draw is exact sampling); walk down from the root.
Randomness comes in as uniforms (sampling.draw), so the same code runs eagerly and in a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.decoding.sampling import Sampling, draw, probs

TYPICAL_EPS, TYPICAL_DELTA = 0.09, 0.3  # Medusa's posterior threshold and alpha


def rows_at(h: Tensor, at: Tensor) -> Tensor:
    """h (B, T, ...) at one index per row at (B,) -> (B, ...)."""
    shape = (h.shape[0], 1) + h.shape[2:]
    return h.gather(1, at.view(-1, *([1] * (h.dim() - 1))).expand(shape))[:, 0]


def rows_at_many(h: Tensor, idx: Tensor) -> Tensor:
    """h (B, T, C) at indices idx (B, n) per row -> (B, n, C)."""
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


def verify_greedy(logits: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy chain verification.

    Args:
        logits: (B, 1+k, V) main logits over the fed tokens [x, d_1..d_k].
        drafts: (B, k).
    Returns:
        (n (B,) accepted drafts, final (B,) the bonus token after them).
    """
    return accept_greedy(logits.argmax(-1), drafts)


def accept_greedy(y: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """`verify_greedy` from the main head's argmax tokens y (B, 1+k) instead of its logits."""
    n = (drafts == y[:, :-1]).cumprod(1).sum(1)  # a bool cumprod is already int64
    return n, y.gather(1, n[:, None]).squeeze(1)


def verify_sampling(logits: Tensor, drafts: Tensor, q: Tensor, s: Sampling, u_accept: Tensor, u_draw: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling over a chain.

    Args:
        logits: (B, 1+k, V) main logits; drafts: (B, k); q: (B, k, V) draft distributions.
        u_accept: (B, k) uniforms for the accept tests; u_draw: (B,) for the emitted token.
    Returns:
        (n (B,), final (B,)) as `verify_greedy`.
    """
    p = probs(logits, s)  # (B, 1+k, V)
    pd = p[:, :-1].gather(2, drafts[..., None])[..., 0]  # (B, k)
    qd = q.gather(2, drafts[..., None])[..., 0]
    n = (u_accept * qd < pd).long().cumprod(1).sum(1)
    p_n = rows_at(p, n)  # (B, V)
    q_n = rows_at(torch.cat([q, torch.zeros_like(q[:, :1])], 1), n)  # q = 0 after the last draft: plain p
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: rejection had prob 0
    return n, draw(residual, u_draw)


def typical_threshold(p: Tensor) -> Tensor:
    """Medusa's acceptance threshold min(eps, delta * exp(-H(p))) for distributions p (..., V)."""
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.clamp(TYPICAL_DELTA * torch.exp(-entropy), max=TYPICAL_EPS)


def verify_typical(logits: Tensor, drafts: Tensor, s: Sampling, u_draw: Tensor) -> tuple[Tensor, Tensor]:
    """LOSSY typical acceptance (Medusa): accept while p(d_j) > min(eps, delta * exp(-H(p))).

    The bonus token is drawn from p after the accepted prefix. The output distribution is NOT
    the model's; at temperature 0 this is greedy verification.
    """
    if s.greedy:
        return verify_greedy(logits, drafts)
    p = probs(logits, s)  # (B, 1+k, V)
    pd = p[:, :-1].gather(2, drafts[..., None])[..., 0]
    n = (pd > typical_threshold(p[:, :-1])).long().cumprod(1).sum(1)
    return n, draw(rows_at(p, n), u_draw)


def verify_tree(logits: Tensor, tokens: Tensor, parent: Tensor, depth: Tensor, k: int, s: Sampling, typical: bool,
                u: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Walk a verified tree down from the root.

    Args:
        logits: (B, N, V) main logits at every node; tokens, parent, depth: (B, N) the nodes.
        k: the tree's depth; u: (B, N) uniforms (sampling only).
    Returns:
        (best (B,) the deepest accepted node (first on ties), n (B,) its depth, final (B,) the
        target's token after it).
    """
    B, N = tokens.shape
    p = None if s.greedy else probs(logits, s)
    y = logits.argmax(-1) if p is None else draw(p, u)  # (B, N) the target's token after each node
    if typical and p is not None:
        p_par = p.gather(1, parent[..., None].expand(-1, -1, p.shape[-1]))  # (B, N, V)
        match = p_par.gather(2, tokens[..., None])[..., 0] > typical_threshold(p_par)
    else:
        match = tokens == y.gather(1, parent)
    match[:, 0] = True
    acc = match
    for _ in range(k):
        acc = match & acc.gather(1, parent)
    best = torch.where(acc, depth, -1).argmax(1)  # (B,)
    n = depth.gather(1, best[:, None])[:, 0]
    return best, n, y.gather(1, best[:, None])[:, 0]

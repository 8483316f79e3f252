"""Verification: which drafted tokens the main head accepts, and the token it emits after them.

Rules (docs/decoding.md has the proofs):
- greedy: accept draft j while it equals the main argmax at j-1; output == plain greedy;
- lossless sampling (Leviathan et al. / Chen et al.): accept draft j with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from normalise(max(0, p_j - q_j));
  when all pass, draw the bonus from p_{k+1}. p and q go through the same warping;
- LOSSY typical acceptance (Medusa): accept while p(d_j) > min(eps, delta * exp(-H(p)));
- trees: one target token per node (argmax, or one draw from p: children of a node carry
  distinct tokens, so following the draw is exact sampling); walk down from the root;
- sampled trees (lossless sampling): children drawn from q without replacement, verified by
  recursive rejection sampling (SpecInfer / SpecTr): try them in draw order, accept child c with
  probability min(1, r(c) / Q(c)), after a rejection r <- normalise(max(0, r - Q)) and Q loses c;
  when no child passes, draw from r.
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


def verify_tree_sampling(logits: Tensor, parent: Tensor, rank: Tensor, k: int, q: Tensor, cand: Tensor, valid: Tensor,
                         s: Sampling, u_accept: Tensor, u_draw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless tree verification by recursive rejection sampling over each node's children.

    The children of a node at depth d-1 are candidates of depth d: cand[:, d-1, r] is the r-th
    token drawn from q_d without replacement, so given the draws before it, its law is q_d with
    those removed (Q_r). From the root, at each depth the current node's children are tried in
    rank order against the running target r (the node's p at first): accepted with probability
    min(1, r(c) / Q_r(c)); on rejection r <- normalise(max(0, r - Q_r)). A rank that is not a child
    of the current node is skipped but still leaves Q (it was drawn). An accepted child becomes
    the current node (r = its p); when none passes, or at a leaf, the emitted token is a draw
    from r. docs/decoding.md has the proof that the output has the target law.

    Args:
        logits: (B, N, V) main logits at every node; parent, rank: (B, N) the nodes (root 0).
        k: the tree's depth; q: (B, k, V) draft distributions; cand, valid: (B, k, R) the drawn
            candidates and whether each was drawn from mass that was left (`trees.sample_candidates`).
        u_accept: (B, k*R) uniforms for the tests; u_draw: (B,) for the emitted token.
    Returns:
        (best (B,) the deepest accepted node, n (B,) its depth, final (B,) the token after it).
    """
    p = probs(logits, s)  # (B, N, V)
    B, N, V = p.shape
    R = cand.shape[-1]
    dev = p.device
    tiny = torch.finfo(torch.float32).tiny
    # child[b, i * R + r] = the node of rank r under node i, or -1.
    child = torch.full((B, N * R + 1), -1, dtype=torch.long, device=dev)
    nodes = torch.arange(N, device=dev).expand(B, N)
    slot = torch.where(nodes > 0, parent * R + rank, N * R)  # the root writes into a spare slot
    child.scatter_(1, slot, nodes)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    n = torch.zeros(B, dtype=torch.long, device=dev)
    r = p[:, 0]  # (B, V) the running target
    searching = torch.ones(B, dtype=torch.bool, device=dev)
    moved = torch.zeros_like(searching)
    # Per candidate only Q's normaliser and the running residual are V wide (a sum; a fused
    # multiply-add, a clamp, a sum and a select), and the few (B,) ops are kept few: they are
    # most of a step's kernel launches on a GPU. The candidates' nodes under the current one are
    # looked up once per depth; the target becomes the accepted child's p, and n its depth, once
    # per depth instead of at every candidate (docs/decoding.md, "what a sampled tree step costs").
    for d in range(k):
        if d:
            r = torch.where(moved[:, None], rows_at(p, cur), r)  # accepted at depth d: the child's p
        tok = cand[:, d]  # (B, R) drawn in this order, without replacement
        c_nodes = child[:, :N * R].view(B, N, R).gather(1, cur[:, None, None].expand(B, 1, R))[:, 0]  # (B, R)
        tries = (c_nodes >= 0) & valid[:, d] & searching[:, None]  # (B, R) children of the current node
        u = u_accept[:, d * R : (d + 1) * R]
        left = q[:, d].float().clone()  # (B, V) q_d minus the draws so far
        open_ = searching.clone()  # rows still looking for a child at this depth
        for j in range(R):
            t = tok[:, j : j + 1]
            inv = left.sum(-1, keepdim=True).clamp_(min=tiny).reciprocal_()  # (B, 1): Q_j = left * inv
            try_ = open_ & tries[:, j]
            acc = try_ & (u[:, j] * (left.gather(1, t) * inv)[:, 0] < r.gather(1, t)[:, 0])
            res = torch.addcmul(r, left, inv, value=-1.0).clamp_(min=0)  # max(0, r - Q_j)
            total = res.sum(-1, keepdim=True)
            # On a rejection r <- normalise(max(0, r - Q)); when r == Q no rejection had mass: r stays.
            r = torch.where((try_ ^ acc)[:, None] & (total > 0), res.div_(total.clamp_(min=tiny)), r)
            cur = torch.where(acc, c_nodes[:, j], cur)
            open_ ^= acc
            left.scatter_(1, t, 0.0)
        moved = searching ^ open_  # rows that accepted a child at this depth
        n += moved
        searching = moved
    r = torch.where(moved[:, None], rows_at(p, cur), r)  # accepted at the last depth: a leaf's p
    return cur, n, draw(r, u_draw)

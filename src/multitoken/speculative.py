"""Self-speculative decoding: the model's own MTP heads draft, its main head verifies, exactly.

Each step feeds the pending token x (the last one emitted, not yet in the cache) plus k drafted
tokens in ONE forward pass, accepts the longest prefix of drafts the main head agrees with, and
emits the main head's own next token after it (the bonus): 1 to k+1 tokens per step. The
rejected drafts' cache entries lie past the row's new position and are simply overwritten.

Where the drafts come from:
- parallel heads and Medusa: the verification pass runs the heads on every fed token; at the
  last accepted position their predictions are the next step's drafts (no extra pass).
- sequential (DeepSeek-V3 / EAGLE) modules: after verification, module 1 runs over the newly
  committed positions with their un-normed main hidden states h^0 and the next tokens; module k
  runs over h^{k-1} and the previous depth's token; each module has its own cache layer.

Verification rules (docs/decoding.md has the proofs and definitions):
- greedy: accept draft j while it equals the main argmax at j-1; output == plain greedy;
- lossless sampling: accept with probability min(1, p/q), on rejection draw from
  normalise(max(0, p - q)); p and q go through the same temperature/top-k/top-p;
- lossy typical acceptance (Medusa): accept when p(draft) > min(eps, delta * exp(-H(p))).
Trees: see trees.py and `tree_steps`; one pass over all nodes with a tree mask. Parallel and
Medusa heads draft trees of any depth; sequential modules draft depth-1 trees (module 1's top
candidates), since deeper module drafting would have to be tree-shaped itself.

Shapes are static per step (always 1+k fed tokens, always N tree nodes); the only host sync in
the loop is the "all rows done?" check.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.generate import Emitter, Sampling, Tally, draw, new_cache, probs, sample

TYPICAL_EPS, TYPICAL_DELTA = 0.09, 0.3  # Medusa's posterior threshold and alpha


def head_kind(model) -> str:
    return model.config.heads.kind if model.mtp is not None else "none"


def rows_at(h: Tensor, at: Tensor) -> Tensor:
    """h (B, T, ...) at one index per row at (B,) -> (B, ...)."""
    shape = (h.shape[0], 1) + h.shape[2:]
    return h.gather(1, at.view(-1, *([1] * (h.dim() - 1))).expand(shape))[:, 0]


def rows_at_many(h: Tensor, idx: Tensor) -> Tensor:
    """h (B, T, C) at indices idx (B, n) per row -> (B, n, C)."""
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


def forward_pieces(model, idx: Tensor, cache, rope_pos: Tensor, slots: Tensor, mask: Tensor, n_heads: int
                   ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One cached pass of the main model, and of the first n_heads parallel/Medusa heads.

    The same blocks as ``model.forward`` in the same order (so greedy results match plain
    decoding), but it also returns the main model's un-normed last hidden state h^0, which
    sequential MTP modules take as input, and runs only the heads that draft.

    Returns:
        (main (B, q, C) normed, last (B, q, C) pre-norm, [head states (B, q, C)] * n_heads).
    """
    kind = head_kind(model)
    L = model.config.n_layers
    rope = model.rope(rope_pos)
    x = model.embed_tokens(idx)  # (B, q, C)
    cut = model.mtp.trunk_layers(model.config) if kind == "parallel" and n_heads else L
    trunk = model.run_layers(x, 0, cut, rope, cache, slots, mask)
    last = model.run_layers(trunk, cut, L, rope, cache, slots, mask)
    main = model.norm(last)
    heads: list[Tensor] = []
    if kind == "parallel":
        heads = [model.norm(block(trunk, rope, cache, slots, mask)) for block in model.mtp.blocks[:n_heads]]
    elif kind == "medusa":
        heads = [head.blocks(main) for head in model.mtp.heads[:n_heads]]
    return main, last, heads


def draft_logits(model, depth: int, h: Tensor, next_pos: Tensor) -> Tensor:
    """Logits (B, V) with which depth `depth` drafts the token at position next_pos (B,).

    The single place drafts come from: tests replace it to stub heads that are always right,
    always wrong, or right every other step.
    """
    return model.logits(h, depth)


def propose(logits: Tensor, s: Sampling, gen: torch.Generator | None, lossless: bool) -> tuple[Tensor, Tensor | None]:
    """A draft token (B,) from draft logits (B, V) and, when sampling losslessly, its distribution q."""
    if s.greedy or not lossless:
        return logits.argmax(-1), None
    q = probs(logits, s)
    return draw(q, gen), q


def commit(emitter: Emitter, tally: Tally, cache, emitted: Tensor, n: Tensor) -> Tensor:
    """Emit n+1 tokens per row (B, q), count them, and advance each unfinished row's cache.

    Returns:
        (B,) tokens each row actually took (fewer at EOS or the token limit).
    """
    active = ~emitter.done
    taken = emitter.push(emitted, n + 1)
    tally.step(active, taken, n)
    cache.advance(torch.where(emitter.done, 0, n + 1))
    return taken


# ---- verification ----------------------------------------------------------------------------------
def verify_greedy(logits: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy chain verification.

    Args:
        logits: (B, 1+k, V) main logits over the fed tokens [x, d_1..d_k].
        drafts: (B, k).
    Returns:
        (n (B,) accepted drafts, final (B,) the bonus token after them).
    """
    y = logits.argmax(-1)  # (B, 1+k)
    n = (drafts == y[:, :-1]).long().cumprod(1).sum(1)
    return n, y.gather(1, n[:, None])[:, 0]


def verify_sampling(logits: Tensor, drafts: Tensor, q: Tensor, s: Sampling, gen: torch.Generator | None
                    ) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling (Leviathan et al. / Chen et al.) over a chain.

    Draft j (drawn from q_j) is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
    rejection the emitted token is drawn from normalise(max(0, p_j - q_j)); when all k pass the
    bonus is drawn from p_{k+1}. Each emitted token then has exactly the target distribution p.

    Args:
        logits: (B, 1+k, V) main logits; drafts: (B, k); q: (B, k, V) draft distributions.
    Returns:
        (n (B,), final (B,)) as `verify_greedy`.
    """
    B, k = drafts.shape
    p = probs(logits, s)  # (B, 1+k, V)
    pd = p[:, :-1].gather(2, drafts[..., None])[..., 0]  # (B, k)
    qd = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(B, k, device=p.device, generator=gen)
    n = (u * qd < pd).long().cumprod(1).sum(1)
    p_n = rows_at(p, n)  # (B, V)
    q_n = rows_at(torch.cat([q, torch.zeros_like(q[:, :1])], 1), n)  # q = 0 after the last draft: plain p
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: rejection had prob 0
    return n, draw(residual, gen)


def typical_threshold(p: Tensor) -> Tensor:
    """Medusa's acceptance threshold min(eps, delta * exp(-H(p))) for distributions p (..., V)."""
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.clamp(TYPICAL_DELTA * torch.exp(-entropy), max=TYPICAL_EPS)


def verify_typical(logits: Tensor, drafts: Tensor, s: Sampling, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """LOSSY typical acceptance (Medusa): accept while p(d_j) > min(eps, delta * exp(-H(p))).

    The bonus token is drawn from p after the accepted prefix. The output distribution is NOT
    the model's; at temperature 0 this is greedy verification.
    """
    if s.greedy:
        return verify_greedy(logits, drafts)
    p = probs(logits, s)  # (B, 1+k, V)
    pd = p[:, :-1].gather(2, drafts[..., None])[..., 0]
    n = (pd > typical_threshold(p[:, :-1])).long().cumprod(1).sum(1)
    return n, draw(rows_at(p, n), gen)


# ---- chain decoding -------------------------------------------------------------------------------
class ModuleDrafter:
    """Drafting with sequential MTP modules over a sliding window of committed positions.

    Module k at position i needs h^{k-1}_i and the token t_{i+k}. After a step has committed C
    tokens (the pending one sits at position C), every module runs over the window of W = 2k
    positions ending at C-1; at C-1 module k reads draft k-1 and writes draft k. Entries a module
    wrote from drafted tokens lie inside the next step's window, so they are always rewritten from
    accepted tokens; the window's start never passes a position that is still provisional.
    """

    def __init__(self, model, B: int, k: int, device: torch.device) -> None:
        S = model.config.max_seq_len + 2 * (k + 1)
        dtype = next(model.parameters()).dtype
        self.model, self.k, self.W = model, k, 2 * k
        self.hbuf = torch.zeros(B, S, model.config.dim, dtype=dtype, device=device)  # h^0 per position
        self.seq = torch.zeros(B, S + k + 1, dtype=torch.long, device=device)  # tokens per position
        self._w = torch.arange(self.W, device=device)

    def record(self, pos: Tensor, last: Tensor, next_tokens: Tensor) -> None:
        """Store h^0 (B, q, C) at positions pos (B, q) and the token after each (B, q)."""
        self.hbuf.scatter_(1, pos[..., None].expand(-1, -1, last.shape[-1]), last)
        self.seq.scatter_(1, pos + 1, next_tokens)

    def draft(self, C: Tensor, s: Sampling, gen, lossless: bool, win: Tensor | None = None, at: Tensor | None = None,
              cache=None) -> tuple[Tensor, Tensor | None]:
        """Drafts (B, k) (and their distributions (B, k, V) when lossless) for positions C+1..C+k."""
        model = self.model
        if win is None:
            win = (C[:, None] - self.W + self._w).clamp(min=0)  # (B, W); clamped duplicates recompute slot 0 alike
            at = torch.full_like(C, self.W - 1)
        rope = model.rope(win.clamp(max=model.config.max_seq_len - 1))
        mask = cache.causal_mask(win)
        h = self.hbuf.gather(1, win[..., None].expand(-1, -1, self.hbuf.shape[-1]))  # (B, W, C)
        drafts, qs, logits = [], [], []
        for kk in range(1, self.k + 1):
            h = model.mtp.step(model, kk, h, self.seq.gather(1, win + kk), rope, cache, win, mask)  # (B, W, C)
            hk = model.mtp.layers[kk - 1].norm(rows_at(h, at))
            logits.append(draft_logits(model, kk, hk, C + kk))
            d, q = propose(logits[-1], s, gen, lossless)
            self.seq.scatter_(1, (C + kk)[:, None], d[:, None])
            drafts.append(d)
            qs.append(q)
        self.logits = torch.stack(logits, 1)  # (B, k, V): what a depth-1 tree takes its candidates from
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs[0] is not None else None)


def head_drafts(model, heads: list[Tensor], at: Tensor, next_pos: Tensor, s: Sampling, gen, lossless: bool
                ) -> tuple[Tensor, Tensor | None]:
    """Drafts (B, k) from parallel/Medusa head states [(B, q, C)] * k at index `at` (B,) per row."""
    out = [propose(draft_logits(model, j, rows_at(h, at), next_pos + j - 1), s, gen, lossless)
           for j, h in enumerate(heads, start=1)]
    d = torch.stack([o[0] for o in out], 1)
    return d, (torch.stack([o[1] for o in out], 1) if out[0][1] is not None else None)


def _prefill(model, cache, idx: Tensor, lengths: Tensor, n_heads: int):
    """Prompt pass with heads; returns (main logits at each row's last position (B, V), last, heads)."""
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    main, last, heads = forward_pieces(model, idx, cache, pos, pos, cache.causal_mask(pos), n_heads)
    cache.rewind(lengths)
    return model.logits(rows_at(main, lengths - 1)), last, heads


def chain_steps(model, idx: Tensor, lengths: Tensor, emitter: Emitter, tally: Tally, k: int, s: Sampling,
                gen: torch.Generator | None, typical: bool = False, cache=None) -> Iterator[tuple[Tensor, Tensor]]:
    """Chain self-speculative decoding; yields (tokens (B, 1+k), taken (B,)) after each forward pass.

    `cache` (optional, fresh, with at least k+1 slots past the context) lets a caller inspect it.
    """
    B, T = idx.shape
    q, Lmax = k + 1, model.config.max_seq_len
    sequential = head_kind(model) == "sequential"
    lossless = not typical
    cache = new_cache(model, B, extra=q + 1) if cache is None else cache
    logits, last, heads = _prefill(model, cache, idx, lengths, 0 if sequential else k)
    x = sample(logits, s, gen)  # (B,)
    yield x[:, None], emitter.push(x[:, None], torch.ones_like(lengths))
    if emitter.done_all():
        return
    if sequential:
        drafter = ModuleDrafter(model, B, k, idx.device)
        pos = torch.arange(T, device=idx.device).expand(B, T)
        drafter.record(pos, last, torch.cat([idx[:, 1:], idx[:, :1]], 1))
        drafter.seq.scatter_(1, lengths[:, None], x[:, None])
        drafts, qd = drafter.draft(lengths, s, gen, lossless, win=pos, at=lengths - 1, cache=cache)
    else:
        drafts, qd = head_drafts(model, heads, lengths - 1, lengths + 1, s, gen, lossless)
    while True:
        fed = torch.cat([x[:, None], drafts], 1)  # (B, q)
        pos = cache.positions(q)
        main, last, heads = forward_pieces(model, fed, cache, pos.clamp(max=Lmax - 1), pos, cache.causal_mask(pos),
                                           0 if sequential else k)
        logits = model.logits(main)  # (B, q, V)
        if typical:
            n, final = verify_typical(logits, drafts, s, gen)
        elif s.greedy:
            n, final = verify_greedy(logits, drafts)
        else:
            n, final = verify_sampling(logits, drafts, qd, s, gen)
        emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], final[:, None])  # (B, q)
        taken = commit(emitter, tally, cache, emitted, n)
        yield emitted, taken
        if emitter.done_all():
            return
        x = final
        if sequential:
            drafter.record(pos, last, emitted)
            drafts, qd = drafter.draft(cache.pos, s, gen, lossless, cache=cache)
        else:
            drafts, qd = head_drafts(model, heads, n, cache.pos + 1, s, gen, lossless)


# ---- tree decoding ----------------------------------------------------------------------------------
def tree_steps(model, idx: Tensor, lengths: Tensor, emitter: Emitter, tally: Tally, tree, s: Sampling,
               gen: torch.Generator | None, typical: bool = False, cache=None) -> Iterator[tuple[Tensor, Tensor]]:
    """Tree self-speculative decoding; yields like `chain_steps` (sequential modules: depth-1 trees).

    Every step builds N nodes (root = the pending token), runs them in one pass where node i
    sits at RoPE position base + depth_i and cache slot base + i and sees the committed prefix
    plus its ancestors, then walks down from the root: a child is accepted when its token equals
    the token the target chose at its parent (argmax, or one draw from p per node: children of a
    node carry distinct tokens, so following the draw is exact sampling). The deepest accepted
    node's path is compacted into the slots after the prefix.
    """
    from multitoken.trees import ancestors, build_nodes

    B, T = idx.shape
    k, N, Lmax = tree.depth, tree.nodes, model.config.max_seq_len
    sequential = head_kind(model) == "sequential"
    cache = new_cache(model, B, extra=N + 1) if cache is None else cache
    logits, last, heads = _prefill(model, cache, idx, lengths, 0 if sequential else k)
    x = sample(logits, s, gen)
    yield x[:, None], emitter.push(x[:, None], torch.ones_like(lengths))
    if emitter.done_all():
        return
    at, levels = lengths - 1, torch.arange(k + 1, device=idx.device)
    if sequential:  # depth-1 trees only (setup checks): module 1's candidates at the last committed position
        drafter = ModuleDrafter(model, B, k, idx.device)
        pos = torch.arange(T, device=idx.device).expand(B, T)
        drafter.record(pos, last, torch.cat([idx[:, 1:], idx[:, :1]], 1))
        drafter.seq.scatter_(1, lengths[:, None], x[:, None])
        drafter.draft(lengths, s, gen, False, win=pos, at=lengths - 1, cache=cache)
    while True:
        base = cache.pos.clone()  # (B,); a copy: advance() below changes cache.pos in place
        if sequential:
            lq = drafter.logits
        else:
            lq = torch.stack([draft_logits(model, j, rows_at(h, at), base + j) for j, h in enumerate(heads, 1)], 1)
        tokens, parent, depth = build_nodes(tree, x, lq)  # (B, N) each
        anc = ancestors(parent, k)  # (B, N, N)
        slots = base[:, None] + torch.arange(N, device=idx.device)
        mask = (cache._slots < base[:, None, None]).expand(B, N, -1).clone()  # committed prefix
        mask.scatter_(2, slots[:, None, :].expand(B, N, N), anc)  # plus ancestors, self included
        main, last, heads = forward_pieces(model, tokens, cache, (base[:, None] + depth).clamp(max=Lmax - 1), slots,
                                           mask, 0 if sequential else k)
        logits = model.logits(main)  # (B, N, V)
        p = None if s.greedy else probs(logits, s)
        y = logits.argmax(-1) if p is None else draw(p, gen)  # (B, N) the target's token after each node
        if typical and p is not None:
            p_par = p.gather(1, parent[..., None].expand(-1, -1, p.shape[-1]))  # (B, N, V)
            match = p_par.gather(2, tokens[..., None])[..., 0] > typical_threshold(p_par)
        else:
            match = tokens == y.gather(1, parent)
        match[:, 0] = True
        acc = match
        for _ in range(k):
            acc = match & acc.gather(1, parent)
        best = torch.where(acc, depth, -1).argmax(1)  # (B,) deepest accepted node (first on ties)
        n = depth.gather(1, best[:, None])[:, 0]
        on_path = anc.gather(1, best[:, None, None].expand(B, 1, N))[:, 0]  # (B, N)
        path = (on_path[:, None, :] & (depth[:, None, :] == levels[None, :, None])).int().argmax(-1)  # (B, k+1)
        final = y.gather(1, best[:, None])[:, 0]
        emitted = torch.cat([tokens.gather(1, path[:, 1:]), x[:, None]], 1).scatter(1, n[:, None], final[:, None])
        cache.compact(base[:, None] + path, base[:, None] + levels)
        taken = commit(emitter, tally, cache, emitted, n)
        yield emitted, taken
        if emitter.done_all():
            return
        x, at = final, best
        if sequential:
            drafter.record(base[:, None] + levels, rows_at_many(last, path), emitted)
            drafter.draft(cache.pos, s, gen, False, cache=cache)


# ---- setup --------------------------------------------------------------------------------------------
def check_draft(model, draft: int | None) -> int:
    """The number of drafted tokens: `draft`, or all heads; a one-line error when impossible."""
    if model.depth == 0:
        raise UserError("speculative decoding needs MTP heads and this model has none: use --mode ntp, or train with --heads KIND:N")
    k = model.depth if draft is None else draft
    if not 1 <= k <= model.depth:
        raise UserError(f"--draft {k}: this model has {model.depth} MTP head(s), so draft between 1 and {model.depth}")
    return k


def setup(model, idx: Tensor, lengths: Tensor, max_new_tokens: int, mode: str, draft: int | None, s: Sampling,
          gen: torch.Generator | None, tree, eos_id: int | None, typical: bool):
    """Build the step iterator for mode "spec" or "tree" (called by `generate.decode`).

    Returns:
        (steps, emitter, tally, k) with k the drafted depth.
    """
    k = check_draft(model, draft)
    L = model.config.max_seq_len
    if mode == "spec":
        emitter = Emitter(lengths, max_new_tokens, L, k + 1, eos_id)
        tally = Tally(k, idx.device)
        return chain_steps(model, idx, lengths, emitter, tally, k, s, gen, typical), emitter, tally, k
    from multitoken.trees import as_tree

    sequential = head_kind(model) == "sequential"
    t = as_tree(tree, draft or (1 if sequential else None), model.depth)
    if sequential and t.depth > 1:
        raise UserError("sequential MTP modules draft trees of depth 1 only: pass --draft 1, or use --mode spec (chain) for deeper drafts")
    emitter = Emitter(lengths, max_new_tokens, L, t.depth + 1, eos_id)
    tally = Tally(t.depth, idx.device)
    return tree_steps(model, idx, lengths, emitter, tally, t, s, gen, typical), emitter, tally, t.depth

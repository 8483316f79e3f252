"""Drafting: the cached decoding pass, and where each head family's drafts come from.

- `decode_pass` runs the main model over fed tokens (``Transformer.backbone``, as
  ``Transformer.forward`` does, so greedy results match plain decoding) and, for families whose
  ``drafts_from_verify`` is True (parallel heads, Medusa), their head states in the same pass:
  at the last accepted position those are the next step's drafts, at no extra pass.
- Sequential (DeepSeek-V3 / EAGLE) modules draft with `ModuleDrafter`: after verification,
  module 1 runs over the newly committed positions with its hidden input (the un-normed main
  state h^0, or with fused heads fc over a low, a middle and a high state, which `decode_pass`
  computes in the same pass: `HeadFamily.hidden_input`) and the next tokens, module k over
  h^{k-1} and the previous depth's token; each module has its own cache layer.
- `draft_logits` is the single place draft logits come from: the family's
  ``HeadFamily.draft_logits`` hook (tests stub a family to make heads that are always right,
  always wrong, or right every other step), spread back over the full vocabulary when the family
  drafts over a reduced one V': tokens outside V' get -inf, so they are never drafted greedily
  and have q = 0 when sampling (verification, over the full vocabulary, stays exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.decoding.sampling import Sampling, draw, probs
from multitoken.decoding.verify import rows_at


def decode_pass(model, idx: Tensor, cache, rope_pos: Tensor, slots: Tensor, mask: Tensor, n_heads: int
                ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One cached pass of the main model, for decoding that drafts with n_heads heads (0: plain
    decoding, the heads are not run).

    Returns:
        (main (B, q, C) normed, hidden (B, q, C), [head states (B, q, C)] * n_heads for families that
        draft from this pass, else []). hidden is what `ModuleDrafter.record` stores: depth 1's
        hidden input (`HeadFamily.hidden_input`: h^0, or the fused states) when n_heads > 0, else
        h^0 (pre-norm).
    """
    rope = model.rope(rope_pos)
    heads = model.mtp if (model.mtp is not None and n_heads) else None
    s = model.backbone(idx, rope, cache, slots, mask, heads=heads is not None)  # (B, q, C) each
    if heads is None:
        return s.main, s.last, []
    return s.main, heads.hidden_input(s), heads.decode_states(model.shared, n_heads, s, rope, cache, slots, mask)


def draft_logits(model, depth: int, h: Tensor, next_pos: Tensor) -> Tensor:
    """Logits (B, V) with which depth `depth` drafts the token at position next_pos (B,) from
    its state h (B, C); -inf outside the family's draft vocabulary."""
    return _full_vocab(model, model.mtp.draft_logits(model.shared, depth, h, next_pos))  # from (B, V') or (B, V)


def draft_logits_all(model, h: Tensor, next_pos: Tensor) -> Tensor:
    """`draft_logits` of depths 1..n at once from their states h (B, n, C), depth 1 drafting the
    token at next_pos (B,): (B, n, V) (the family's one-matmul `draft_logits_all`)."""
    return _full_vocab(model, model.mtp.draft_logits_all(model.shared, h, next_pos))


def _full_vocab(model, lg: Tensor) -> Tensor:
    """Draft logits (..., V') spread over the full vocabulary (..., V), -inf outside V'."""
    ids = model.mtp.draft_ids
    if ids is None or lg.shape[-1] == model.config.vocab_size:
        return lg
    full = lg.new_full((*lg.shape[:-1], model.config.vocab_size), float("-inf"))
    return full.index_copy_(-1, ids, lg)


def propose(logits: Tensor, s: Sampling, lossless: bool, u: Tensor) -> tuple[Tensor, Tensor | None]:
    """A draft token (B,) from draft logits (B, V) and, when sampling losslessly, its distribution q."""
    if s.greedy or not lossless:
        return logits.argmax(-1), None
    q = probs(logits, s)
    return draw(q, u), q


def first_heads(states: list[Tensor] | Tensor, k: int) -> list[Tensor] | Tensor:
    """The first k heads' states of a verification pass: [(B, q, C)] * n, or stacked (B, q, n, C)."""
    return states[:, :, :k] if isinstance(states, Tensor) else states[:k]


def head_drafts(model, states: list[Tensor] | Tensor, at: Tensor, next_pos: Tensor, s: Sampling, lossless: bool,
                u: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Drafts (B, k), their distributions (B, k, V) or None, and draft logits (B, k, V), from head
    states [(B, q, C)] * k (or stacked, (B, q, k, C)) at fed index `at` (B,) per row; u (B, k) uniforms."""
    hs = rows_at(states if isinstance(states, Tensor) else torch.stack(states, 2), at)  # (B, k, C): one gather
    logits = draft_logits_all(model, hs, next_pos)  # (B, k, V): one matmul for every head
    if s.greedy or not lossless:  # argmax drafts: one op for every depth
        return logits.argmax(-1), None, logits
    out = [propose(logits[:, j], s, lossless, u[:, j]) for j in range(hs.shape[1])]
    return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1), logits


CATCH_UP_CHUNK = 64
"""Positions per pass when `ModuleDrafter.catch_up` rewrites a long stretch (its attention scores
grow as chunk x live slots)."""


def record(state, pos: Tensor, last: Tensor, next_tokens: Tensor) -> None:
    """Store h^0 (B, q, C) at positions pos (B, q) and the token after each (B, q): what sequential
    modules draft from. Plain steps store it too, so that drafting can resume after them."""
    state.hbuf.scatter_(1, pos[..., None].expand(-1, -1, last.shape[-1]), last.to(state.hbuf.dtype))
    state.seq.scatter_(1, pos + 1, next_tokens)


class ModuleDrafter:
    """Drafting with sequential MTP modules over a sliding window of committed positions.

    Module j at position i needs h^{j-1}_i and the token t_{i+j}. After a step has committed C
    tokens (the pending one sits at position C), modules 1..k run over the window of W = k+1
    positions ending at C-1; at C-1 module j reads draft j-1 and writes draft j.
    Why k+1 is enough: after a step that accepted n of the drafts drafted at C', module j's entries
    that may be wrong are those whose tokens t_{i+1..i+j} reach past the accepted ones, positions
    i >= C' + n + 1 - j, and the n+1 positions C'..C-1 are new: max(n+1, j) <= k+1 positions
    ending at C-1. Entries made from drafts that were accepted equal those made from the tokens
    themselves, so they stay. One window for every depth keeps each depth's window inside the one
    below it, whose states it reads. The buffers (depth 1's hidden input, h^0 or the fused states,
    and the token per position) live in the `DecodeState`.

    Modules deeper than k do not run in a step of k drafts, so their cache entries fall behind.
    Before a longer draft runs, `catch_up` rewrites every module's entries over the positions
    since then (the loop knows how far back, `api.Generation`), so a short stretch never leaves
    a deeper module attending to entries it did not write from the accepted tokens.
    """

    def __init__(self, model, state, k: int) -> None:
        self.model, self.state, self.k, self.W = model, state, k, k + 1
        self.depths = model.depth
        """Modules a prefill or a catch-up runs (every one, whatever k drafts)."""
        self._w = torch.arange(max(self.W, CATCH_UP_CHUNK), device=state.device)

    def record(self, pos: Tensor, hidden: Tensor, next_tokens: Tensor) -> None:
        """Store depth 1's hidden input (B, q, C) (`decode_pass`'s second output) at positions
        pos (B, q) and the token after each (B, q)."""
        record(self.state, pos, hidden, next_tokens)

    def draft(self, C: Tensor, s: Sampling, lossless: bool, u: Tensor, win: Tensor | None = None,
              at: Tensor | None = None, depths: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Drafts (B, k) (their distributions (B, k, V) when lossless) and draft logits (B, k, V) for
        positions C+1..C+k; u (B, k) uniforms.

        Args:
            win, at: the positions (B, W) the modules run over and the index (B,) of C-1 in them
                (default: the step's window of k+1 positions ending at C-1).
            depths: modules to run (default k; more only write their cache entries: their
                entries at positions i > C-j read tokens that are not drafts, and are provisional).
        """
        model, st, cache = self.model, self.state, self.state.cache
        if win is None:
            win = (C[:, None] - self.W + self._w[: self.W]).clamp(min=0)  # (B, W); clamped duplicates recompute slot 0 alike
            at = torch.full_like(C, self.W - 1)
        rope = model.rope(win.clamp(max=model.config.max_seq_len - 1))
        mask = cache.causal_mask(win)
        h = st.hbuf.gather(1, win[..., None].expand(-1, -1, st.hbuf.shape[-1]))  # (B, W, C)
        drafts, qs, logits = [], [], []
        for kk in range(1, max(self.k, depths or 0) + 1):
            h = model.mtp.step(model.shared, kk, h, st.seq.gather(1, win + kk), rope, cache, win, mask)  # (B, W, C)
            if kk > self.k:
                continue
            hk = model.mtp.draft_state(kk, rows_at(h, at))
            logits.append(draft_logits(model, kk, hk, C + kk))
            d, q = propose(logits[-1], s, lossless, u[:, kk - 1])
            st.seq.scatter_(1, (C + kk)[:, None], d[:, None])
            drafts.append(d)
            qs.append(q)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs[0] is not None else None), torch.stack(logits, 1)

    def catch_up(self, C: Tensor, width: int, s: Sampling, lossless: bool, u: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Rewrite every module's cache entries over the `width` positions before C (B,), then draft
        k tokens afresh (as `draft`). Runs at a host check, outside any captured step: chunks of
        `CATCH_UP_CHUNK` positions, left to right, each module's entries written before a later
        chunk attends to them."""
        ch = min(width, CATCH_UP_CHUNK)
        width = -(-width // ch) * ch
        start = C[:, None] - width
        for off in range(0, width - ch, ch):
            self._run((start + off + self._w[:ch]).clamp(min=0))
        win = (C[:, None] - ch + self._w[:ch]).clamp(min=0)
        return self.draft(C, s, lossless, u, win=win, at=torch.full_like(C, ch - 1), depths=self.depths)

    def _run(self, win: Tensor) -> None:
        """Every module over positions win (B, W): cache entries only, no drafts."""
        model, st, cache = self.model, self.state, self.state.cache
        rope = model.rope(win.clamp(max=model.config.max_seq_len - 1))
        mask = cache.causal_mask(win)
        h = st.hbuf.gather(1, win[..., None].expand(-1, -1, st.hbuf.shape[-1]))
        for kk in range(1, self.depths + 1):
            h = model.mtp.step(model.shared, kk, h, st.seq.gather(1, win + kk), rope, cache, win, mask)

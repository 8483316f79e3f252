"""Strategies: plain, chain and tree decoding, each a prefill and a step that update a `DecodeState`.

A step reads and writes only the state (in place), so the runner can compile it and capture it
as a CUDA graph; everything it depends on besides the state (draft length, tree, sampling
settings) is fixed when the strategy is built and named by its `key`.

Every step feeds the pending token x (emitted, not yet in the cache), plus drafts:
- `Plain`: x alone; samples the next token.
- `Chain`: x and k drafted tokens in ONE pass; accepts the longest agreeing prefix and emits
  the main head's own next token after it (the bonus): 1 to k+1 tokens. Rejected drafts' cache
  entries lie past the row's new position and are simply overwritten.
- `Tree`: N nodes (root = x) at RoPE position base + depth and cache slot base + i, each seeing
  the committed prefix plus its ancestors; the deepest accepted node's path is compacted into
  the slots after the prefix. Every family drafts trees of any depth: parallel and Medusa
  heads give each depth's candidates from the verification pass; sequential modules give
  module d's candidates conditioned on the top-1 draft of depths < d (the drafter's chain), the
  side branches of a deeper level reusing that distribution as parallel heads do (exact either
  way: verification decides).
When sampling losslessly a tree keeps its shape, but its candidates of rank r at depth d are the
r-th draws from q_d without replacement, verified by recursive rejection sampling (verify.py).
Uniforms: plain uses rand[:, 0]; chain rand[:, :k] (accept tests), rand[:, k] (emitted token),
rand[:, k+1:2k+1] (next drafts); tree rand[:, :N] (one target draw per node), or when sampling
rand[:, :kR] (candidate draws, R ranks), rand[:, kR:2kR] (tests) and rand[:, 2kR] (emitted token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.decoding.drafting import ModuleDrafter, decode_pass, first_heads, head_drafts, record
from multitoken.decoding.sampling import Sampling, probs, sample
from multitoken.decoding.state import DecodeState
from multitoken.decoding.trees import StaticTree, ancestors, build_nodes, build_sampled_nodes, candidate_ranks, sample_candidates
from multitoken.decoding.verify import (accept_greedy, rows_at, rows_at_many, verify_sampling, verify_tree, verify_tree_sampling,
                                        verify_typical)


class Strategy:
    """What every strategy has: `q` fed tokens per step, `k` draft positions, a `key`, prefill and step."""

    q: int = 1
    k: int = 0
    key: tuple = ()

    def __init__(self, model, state: DecodeState, s: Sampling) -> None:
        self.model, self.state, self.s = model, state, s
        self.L = model.config.max_seq_len

    def _prompt_pass(self, idx: Tensor, lengths: Tensor, n_heads: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Prompt pass (right-padded, any width); returns (logits at each row's last token (B, V), last, states)."""
        st, B, T = self.state, idx.shape[0], idx.shape[1]
        pos = torch.arange(T, device=idx.device).expand(B, T)
        main, last, states = decode_pass(self.model, idx, st.cache, pos, pos, st.cache.causal_mask(pos), n_heads)
        st.cache.rewind(lengths)
        return self.model.logits(rows_at(main, lengths - 1)), last, states

    def _emit_first(self, logits: Tensor) -> None:
        st = self.state
        x = sample(logits, self.s, st.rand[:, 0])
        st.x.copy_(x)
        st.emitter.push(x[:, None], torch.ones_like(x))

    def _commit(self, emitted: Tensor, n: Tensor) -> None:
        """Emit n+1 tokens per row (B, q'), count them, advance each unfinished row's cache."""
        st = self.state
        active = ~st.emitter.done
        taken = st.emitter.push(emitted, n + 1)
        st.tally.step(active, taken, n if self.k else None, self.k)
        st.cache.pos.add_(torch.where(st.emitter.done, 0, n + 1))


class Plain(Strategy):
    """Plain next-token decoding: the main model only.

    With `record` (plain steps between drafting ones, for sequential modules) it also stores each
    position's depth-1 hidden input (h^0, or the fused states) and token, as a chain step does, so that drafting can resume after it
    (`_Drafting.resume`): two small scatters per step.
    """

    def __init__(self, model, state: DecodeState, s: Sampling, record: bool = False) -> None:
        super().__init__(model, state, s)
        self.record = record and state.hbuf is not None
        self.key = ("plain", self.record, s)  # the sampling last, as every kind (bench decode reads it)

    def prefill(self, idx: Tensor, lengths: Tensor) -> None:
        # Recording runs the heads' part of the pass too (n_heads 1): what is recorded is depth 1's
        # hidden input, h^0 or fused states (`HeadFamily.hidden_input`), as a drafting step records it.
        logits, last, _ = self._prompt_pass(idx, lengths, int(self.record))
        self._emit_first(logits)
        if self.record:
            B, T = idx.shape
            record(self.state, torch.arange(T, device=idx.device).expand(B, T), last,
                   torch.cat([idx[:, 1:], idx[:, :1]], 1))
            self.state.seq.scatter_(1, lengths[:, None], self.state.x[:, None])

    def step(self) -> None:
        st, model = self.state, self.model
        pos = st.cache.pos[:, None]  # (B, 1)
        main, last, _ = decode_pass(model, st.x[:, None], st.cache, pos.clamp(max=self.L - 1), pos,
                                    st.cache.causal_mask(pos), int(self.record))
        y = sample(model.logits(main[:, 0]), self.s, st.rand[:, 0])  # (B,)
        if self.record:
            record(st, pos, last, y[:, None])
        active = ~st.emitter.done
        taken = st.emitter.push(y[:, None], torch.ones_like(y))
        st.tally.step(active, taken)
        st.cache.pos.add_(active.long())
        st.x.copy_(y)


class _Drafting(Strategy):
    """Shared by chain and tree: the family's drafter, the first drafts after the prompt, and
    fresh drafts when the loop lengthens the draft or resumes drafting after plain steps."""

    def __init__(self, model, state: DecodeState, s: Sampling, k: int, lossless: bool) -> None:
        super().__init__(model, state, s)
        self.k = k
        self.lossless = lossless
        self.from_verify = model.mtp.drafts_from_verify
        self.drafter = None if self.from_verify else ModuleDrafter(model, state, k)
        self.head_caches = self.from_verify and model.mtp.cache_layers(model.config) > 0
        self.n_states = k  # heads run in the verification pass (a chain runs every head with a cache)

    def _set_drafts(self, d: Tensor, qd: Tensor | None, lq: Tensor) -> None:
        st = self.state
        st.drafts[:, : self.k].copy_(d)
        if qd is not None:
            st.qd[:, : self.k].copy_(qd)
        if st.lq is not None:
            st.lq[:, : self.k].copy_(lq)

    def _draft_uniforms(self) -> Tensor:
        st, k = self.state, self.k
        return st.rand[:, k + 1 : 2 * k + 1] if st.rand.shape[1] >= 2 * k + 1 else st.rand[:, :k]

    @property
    def resumable(self) -> bool:
        """Whether `resume` gives drafts as good as those of a run that never stopped: sequential
        modules (they catch up) and heads without cache layers (Medusa: they read the main state);
        parallel heads' blocks would have missed the positions of plain steps."""
        return not self.head_caches

    def resume(self, width: int, since: int) -> None:
        """Fresh drafts before this strategy's first step after one of `since` < k drafts (0: plain).

        Sequential modules rewrite every module's cache entries over the last `width` positions
        of each row (where some were not kept, `ModuleDrafter.catch_up`) and draft afresh; st.rand
        must hold uniforms no emitted token used (the loop fills them). Families that draft from
        the verification pass keep no state that needs it: their drafts at positions past `since`
        were kept from an earlier step, and get a point-mass distribution (q = 1 at the draft),
        under which lossless verification is exact for any draft drawn independently of the
        step's uniforms, as every kept draft was (a kept q might not be the law its draft came
        from: a row that joined in a short stretch never drew them).
        """
        st = self.state
        if not self.from_verify:
            self._set_drafts(*self.drafter.catch_up(st.cache.pos, width, self.s, self.lossless, self._draft_uniforms()))
        elif st.qd is not None:
            kept = st.drafts[:, since : self.k]
            st.qd[:, since : self.k].copy_(torch.nn.functional.one_hot(kept, st.V).to(st.qd.dtype))

    def prefill(self, idx: Tensor, lengths: Tensor) -> None:
        st, k = self.state, self.k
        logits, last, states = self._prompt_pass(idx, lengths, self.n_states if self.from_verify else k)
        self._emit_first(logits)
        u = self._draft_uniforms()
        if self.from_verify:
            self._set_drafts(*head_drafts(self.model, first_heads(states, k), lengths - 1, lengths + 1, self.s, self.lossless, u))
        else:
            B, T = idx.shape
            pos = torch.arange(T, device=idx.device).expand(B, T)
            self.drafter.record(pos, last, torch.cat([idx[:, 1:], idx[:, :1]], 1))
            st.seq.scatter_(1, lengths[:, None], st.x[:, None])
            self._set_drafts(*self.drafter.draft(lengths, self.s, self.lossless, u, win=pos, at=lengths - 1,
                                                 depths=self.drafter.depths))


class Chain(_Drafting):
    """Chain self-speculative decoding with k drafts (lossless, or Medusa's LOSSY typical acceptance).

    `switching`: the loop may change the draft length (`generate(draft=None)`). Heads with cache
    layers of their own (parallel heads' blocks) then all run in every verification pass,
    whatever k drafts, so that a stretch of shorter drafts leaves none of their entries behind.
    """

    def __init__(self, model, state: DecodeState, s: Sampling, k: int, typical: bool = False,
                 switching: bool = False) -> None:
        super().__init__(model, state, s, k, lossless=not typical)
        self.q, self.typical = k + 1, typical
        self.key = ("chain", k, typical, switching, s)
        if self.head_caches and switching:
            self.n_states = model.depth
        self._ar = torch.arange(self.q, device=state.device)

    def step(self) -> None:
        st, model, k, s = self.state, self.model, self.k, self.s
        fed = st.fed[:, : k + 1]  # (B, q): x and the drafts, in place
        drafts = fed[:, 1:]
        pos = st.cache.pos[:, None] + self._ar  # (B, q)
        main, last, states = decode_pass(model, fed, st.cache, pos.clamp(max=self.L - 1), pos,
                                         st.cache.causal_mask(pos), self.n_states if self.from_verify else k)
        logits = model.logits(main)  # (B, q, V)
        if self.typical:
            n, final = verify_typical(logits, drafts, s, st.rand[:, k])
        elif s.greedy:
            # The main head's argmax row is the emitted sequence: accepted drafts equal it, and the
            # bonus token is its entry after them (entries further on are never taken).
            y = logits.argmax(-1)  # (B, q)
            n, final = accept_greedy(y, drafts)
        else:
            n, final = verify_sampling(logits, drafts, st.qd[:, :k], s, st.rand[:, :k], st.rand[:, k])
        if not s.greedy or self.typical:
            y = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], final[:, None])  # (B, q)
        self._commit(y, n)
        st.x.copy_(final)
        u = st.rand[:, k + 1 : 2 * k + 1]
        if self.from_verify:
            self._set_drafts(*head_drafts(model, first_heads(states, k), n, st.cache.pos + 1, s, self.lossless, u))
        else:
            self.drafter.record(pos, last, y)
            self._set_drafts(*self.drafter.draft(st.cache.pos, s, self.lossless, u))


class Tree(_Drafting):
    """Tree self-speculative decoding over a `StaticTree` or a `DynamicTree` (built on the device)."""

    def __init__(self, model, state: DecodeState, s: Sampling, tree, typical: bool = False) -> None:
        super().__init__(model, state, s, tree.depth, lossless=False)
        self.tree, self.typical = tree, typical
        self.q = tree.nodes
        self.key = ("tree", repr(tree), typical, s)
        dev, B, N = state.device, state.batch_size, tree.nodes
        self._ar = torch.arange(N, device=dev)
        self._levels = torch.arange(self.k + 1, device=dev)
        self._anc = None
        self.R = candidate_ranks(tree)
        # Lossless sampling: sampled candidates and recursive rejection sampling, when the step's
        # uniforms hold 2kR + 1 numbers; else the top-R tree with one target draw per node (exact
        # too, but it accepts only the p-mass of the top candidates).
        self.sampled = not s.greedy and not typical and state.rand.shape[1] >= 2 * self.k * self.R + 1
        if isinstance(tree, StaticTree):  # a static tree's shape never changes: its ancestors once
            parent = tree.tensors(dev)[0].expand(B, -1)
            self._anc = ancestors(parent, self.k)

    def step(self) -> None:
        st, model, k, N, s, R = self.state, self.model, self.k, self.q, self.s, self.R
        cache, B = st.cache, st.batch_size
        base = cache.pos.clone()  # (B,); advancing below changes cache.pos in place
        x = st.x.clone()
        if self.sampled:
            q = probs(st.lq[:, :k], s)  # (B, k, V)
            cand, valid = sample_candidates(q, st.rand[:, : k * R].view(B, k, R))
            tokens, parent, depth, rank = build_sampled_nodes(self.tree, x, st.lq[:, :k], cand)
        else:
            tokens, parent, depth = build_nodes(self.tree, x, st.lq[:, :k])  # (B, N) each
        anc = self._anc if self._anc is not None else ancestors(parent, k)  # (B, N, N)
        slots = base[:, None] + self._ar
        mask = cache.prefix_mask(base, N).clone()  # committed prefix
        mask.scatter_(2, slots[:, None, :].expand(B, N, N), anc)  # plus ancestors, self included
        main, last, states = decode_pass(model, tokens, cache, (base[:, None] + depth).clamp(max=self.L - 1), slots,
                                         mask, self.n_states if self.from_verify else k)
        logits = model.logits(main)  # (B, N, V)
        if self.sampled:
            best, n, final = verify_tree_sampling(logits, parent, rank, k, q, cand, valid, s,
                                                  st.rand[:, k * R : 2 * k * R], st.rand[:, 2 * k * R])
        else:
            best, n, final = verify_tree(logits, tokens, parent, depth, k, s, self.typical, st.rand[:, :N])
        on_path = anc.gather(1, best[:, None, None].expand(B, 1, N))[:, 0]  # (B, N)
        path = (on_path[:, None, :] & (depth[:, None, :] == self._levels[None, :, None])).int().argmax(-1)  # (B, k+1)
        emitted = torch.cat([tokens.gather(1, path[:, 1:]), x[:, None]], 1).scatter(1, n[:, None], final[:, None])
        cache.compact(base[:, None] + path, base[:, None] + self._levels)
        self._commit(emitted, n)
        st.x.copy_(final)
        zero_u = st.rand[:, :k]  # drafts are top-k candidates: no draws
        if self.from_verify:
            self._set_drafts(*head_drafts(model, first_heads(states, k), best, cache.pos + 1, s, False, zero_u))
        else:
            self.drafter.record(base[:, None] + self._levels, rows_at_many(last, path), emitted)
            self._set_drafts(*self.drafter.draft(cache.pos, s, False, zero_u))

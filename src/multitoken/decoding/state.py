"""Decode state: every buffer a decoding step reads or writes, allocated once and updated in place.

One `DecodeState` serves every `generate` call on one model at one batch size: the KV cache
(the MTP blocks' layers included) with scratch slots for the largest draft or tree, the output
buffer with its per-row counts, budgets and done flags (`Emitter`), device-side statistics
(`Tally`), the loop state (pending token, drafts, their distributions, the heads' draft
logits), the sequential drafter's buffers and the step's random numbers. Nothing is rebound
during decoding, only written into, so a step that reads and writes this state can be captured
once as a CUDA graph and replayed (nanochat/gpt-fast keep their caches the same way).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.model.kv_cache import KVCache
from multitoken.model.layers import fuse_projections


def prepare_prompts(prompt_ids, max_seq_len: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad prompts into (B, T) and return them with their lengths (B,).

    Args:
        prompt_ids: a (B, T) LongTensor (every row full length), a list of ints (one prompt)
            or a list of lists (prompts of different lengths).
        max_seq_len: the model's context; every prompt must be shorter.
    Returns:
        (idx (B, T), lengths (B,)) on `device`.
    """
    if isinstance(prompt_ids, Tensor):
        rows = [prompt_ids.tolist()] if prompt_ids.dim() == 1 else prompt_ids.tolist()
    else:
        rows = list(prompt_ids)
        if rows and all(isinstance(t, int) for t in rows):
            rows = [rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise UserError("empty prompt: give at least one token of prompt text")
    longest = max(len(r) for r in rows)
    if longest >= max_seq_len:
        raise UserError(f"prompt of {longest} tokens does not fit the context of {max_seq_len}: shorten the prompt")
    idx = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return idx.to(device), lengths.to(device)


class Emitter:
    """Output buffer of generated tokens per row: applies EOS, the token budget, and done flags.

    Each row may generate ``min(max_new_tokens, max_seq_len - prompt_length)`` tokens, so that
    prompt plus output always fit the context. A step pushes up to q tokens per row; rows that
    are done take none. Buffers are allocated once (`width` tokens per row plus scratch) and
    `reset` starts a new call in place.
    """

    def __init__(self, batch_size: int, width: int, q_max: int, device: torch.device | str) -> None:
        B = batch_size
        self.out = torch.zeros(B, width + q_max, dtype=torch.long, device=device)
        self.budget = torch.zeros(B, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.ones(B, dtype=torch.bool, device=device)
        self.eos = torch.full((B,), -1, dtype=torch.long, device=device)  # -1: no EOS
        self._cols = torch.arange(q_max, device=device)

    def reset(self, lengths: Tensor, max_new_tokens: int, max_seq_len: int, eos_id: int | None) -> None:
        self.budget.copy_((max_seq_len - lengths).clamp(max=max_new_tokens))
        self.count.zero_()
        self.done.copy_(self.budget <= 0)
        self.eos.fill_(-1 if eos_id is None else eos_id)

    def push(self, tokens: Tensor, n: Tensor) -> Tensor:
        """Append the first n (B,) of tokens (B, q) per row; return how many each row took (B,)."""
        q = tokens.shape[1]
        cols = self._cols[:q]
        n = torch.where(self.done, 0, n)
        hit = (tokens == self.eos[:, None]) & (cols < n[:, None])  # (B, q)
        any_hit = hit.any(1)
        n = torch.where(any_hit, hit.int().argmax(1) + 1, n)
        n = torch.minimum(n, self.budget - self.count)
        idx = (self.count[:, None] + cols).clamp(max=self.out.shape[1] - 1)
        # Writes past a row's new count are overwritten later or cut off by `tokens`.
        self.out.scatter_(1, idx, tokens)
        self.count.add_(n)
        self.done.copy_(self.done | any_hit | (self.count >= self.budget))
        return n

    def tokens(self) -> list[list[int]]:
        return [row[:c] for row, c in zip(self.out.tolist(), self.count.tolist())]


class Tally:
    """Device-side counters (no host sync per step), read into `GenerationStats` at the end."""

    def __init__(self, k_max: int, device: torch.device | str) -> None:
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # steps in which some row was active
        self.row_steps = torch.zeros((), dtype=torch.long, device=device)
        self.step_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.accepted = torch.zeros(max(k_max, 1), dtype=torch.long, device=device)  # per draft position
        self._j = torch.arange(1, max(k_max, 1) + 1, device=device)

    def reset(self) -> None:
        for t in (self.steps, self.row_steps, self.step_tokens, self.accepted):
            t.zero_()

    def step(self, active: Tensor, emitted: Tensor, n_accepted: Tensor | None = None) -> None:
        """Record one step: active (B,) rows, emitted (B,) tokens each, n_accepted (B,) drafts each."""
        self.steps.add_(active.any().long())
        self.row_steps.add_(active.sum())
        self.step_tokens.add_(torch.where(active, emitted, 0).sum())
        if n_accepted is not None:
            self.accepted.add_(((n_accepted[:, None] >= self._j) & active[:, None]).sum(0))

    def read(self, k: int) -> tuple[int, int, int, list[int]]:
        """(steps, row_steps, step_tokens, accepted per position for the first k positions): one sync."""
        vals = torch.cat([self.steps[None], self.row_steps[None], self.step_tokens[None], self.accepted]).tolist()
        return vals[0], vals[1], vals[2], vals[3 : 3 + k]


class DecodeState:
    """All decoding buffers for one model and batch size (see the module docstring).

    Args:
        model: the `Transformer` to decode.
        batch_size: rows.
        scratch: cache slots past the context for drafts or tree nodes (the largest step's fed
            tokens plus one).
        rand_width: uniforms per row and step.
    """

    def __init__(self, model, batch_size: int, scratch: int, rand_width: int) -> None:
        cfg = model.config
        # q/k/v and gate/up as one matmul each (the parameters become views: same names and values).
        # Done before the engine records where the weights live, so its fingerprint sees the move.
        fuse_projections(model)
        p = next(model.parameters())
        dev, dtype = p.device, p.dtype
        B, L, k = batch_size, cfg.max_seq_len, max(model.depth, 1)
        self.batch_size, self.scratch, self.rand_width = B, scratch, rand_width
        self.device = dev
        self.cache = KVCache.for_model(cfg, B, L + scratch, dtype, dev)
        self.emitter = Emitter(B, L, scratch, dev)
        self.tally = Tally(k, dev)
        self.x = torch.zeros(B, dtype=torch.long, device=dev)  # the pending token (emitted, not yet in the cache)
        self.drafts = torch.zeros(B, k, dtype=torch.long, device=dev)
        self.qd: Tensor | None = None  # (B, k, V) draft distributions, allocated when sampling losslessly
        self.lq: Tensor | None = None  # (B, k, V) draft logits a tree is built from
        self.at = torch.zeros(B, dtype=torch.long, device=dev)  # fed index the next drafts come from
        self.rand = torch.zeros(B, rand_width, device=dev)
        self.emitted = torch.zeros(B, scratch, dtype=torch.long, device=dev)
        self.taken = torch.zeros(B, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(B, dtype=torch.long, device=dev)
        self.hbuf: Tensor | None = None  # sequential drafter: h^0 per position (B, S, C)
        self.seq: Tensor | None = None  # sequential drafter: token per position (B, S + k + 1)
        if model.mtp is not None and not model.mtp.drafts_from_verify:
            S = L + scratch
            self.hbuf = torch.zeros(B, S, cfg.dim, dtype=dtype, device=dev)
            self.seq = torch.zeros(B, S + k + 1, dtype=torch.long, device=dev)
        self.V = cfg.vocab_size

    def ensure_sampling_buffers(self, k: int) -> None:
        if self.qd is None:
            self.qd = torch.zeros(self.batch_size, max(k, 1), self.V, device=self.device)

    def ensure_tree_buffers(self, k: int) -> None:
        if self.lq is None:
            self.lq = torch.zeros(self.batch_size, max(k, 1), self.V, device=self.device,
                                  dtype=self.cache.k.dtype)

    def small_tensors(self) -> list[Tensor]:
        """The loop state a warm-up or capture run may change and must give back (not the big buffers)."""
        ts = [self.cache.pos, self.emitter.budget, self.emitter.count, self.emitter.done, self.tally.steps,
              self.tally.row_steps, self.tally.step_tokens, self.tally.accepted, self.x, self.drafts, self.at,
              self.rand, self.emitted, self.taken]
        return ts + [t for t in (self.qd, self.lq) if t is not None]

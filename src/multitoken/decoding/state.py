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

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

from multitoken.config import MAX_EOS_IDS
from multitoken.decoding.inputs import prompt_rows
from multitoken.errors import UserError
from multitoken.model.kv_cache import KVCache
from multitoken.model.layers import fuse_projections


def prepare_prompts(prompt_ids, max_seq_len: int, device: torch.device | str = "cpu",
                    vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad prompts into (B, T) and return them with their lengths (B,).

    Args:
        prompt_ids: a (B, T) LongTensor (every row full length), a list of ints (one prompt)
            or a list of lists (prompts of different lengths).
        max_seq_len: the model's context; every prompt must be shorter.
        vocab_size: every id must be below it (None: not checked); see `inputs.prompt_rows`.
    Returns:
        (idx (B, T), lengths (B,)) on `device`.
    """
    text_hint = "for text, use multitoken.load(...).generate('...') or encode it with the tokenizer first"
    if isinstance(prompt_ids, str) or (isinstance(prompt_ids, (list, tuple)) and any(isinstance(r, str) for r in prompt_ids)):
        raise UserError(f"prompts are token ids here, not text: {text_hint}")
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool \
                or prompt_ids.dim() not in (1, 2):
            raise UserError(f"prompt tensor of dtype {prompt_ids.dtype} and shape {tuple(prompt_ids.shape)}: give integer "
                            "token ids, (T,) or (B, T)")
        rows = [prompt_ids.tolist()] if prompt_ids.dim() == 1 else prompt_ids.tolist()
    elif isinstance(prompt_ids, (list, tuple)):
        rows = list(prompt_ids)
        if rows and all(isinstance(t, Integral) for t in rows):
            rows = [rows]
    else:
        raise UserError(f"prompts must be token ids (a list of ints, a list of lists or a LongTensor), not "
                        f"{type(prompt_ids).__name__}: {text_hint}")
    if not all(isinstance(r, (list, tuple)) and all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 for t in r)
               for r in rows):
        raise UserError("prompts must be lists of non-negative integer token ids (one list per prompt)")
    if vocab_size is not None:
        rows = prompt_rows(rows, vocab_size)  # an id past the vocabulary names itself, not an IndexError
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


def eos_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    """The stop ids of a call: none, one, or several (at most MAX_EOS_IDS)."""
    ids = [] if eos_id is None else [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]
    if len(ids) > MAX_EOS_IDS:
        raise UserError(f"{len(ids)} EOS ids given: at most {MAX_EOS_IDS} are supported")
    return ids


def eos_row(eos_id: int | Sequence[int] | None) -> list[int]:
    """`eos_ids` padded with -1 to MAX_EOS_IDS columns: one row of the emitter's EOS table."""
    ids = eos_ids(eos_id)
    return ids + [-1] * (MAX_EOS_IDS - len(ids))


class Emitter:
    """Output buffer of generated tokens per row: applies EOS, the token budget, and done flags.

    Each row may generate ``min(max_new_tokens, max_seq_len - prompt_length)`` tokens, so that
    prompt plus output always fit the context. A step pushes up to q tokens per row; rows that
    are done take none. Buffers are allocated once (`width` tokens per row plus scratch); `join`
    starts rows in place (continuous batching: a row that joins does not disturb the others).
    """

    def __init__(self, batch_size: int, width: int, q_max: int, device: torch.device | str) -> None:
        B = batch_size
        self.out = torch.zeros(B, width + q_max, dtype=torch.long, device=device)
        self.budget = torch.zeros(B, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.ones(B, dtype=torch.bool, device=device)
        self.eos = torch.full((B, MAX_EOS_IDS), -1, dtype=torch.long, device=device)  # -1: no EOS in that column
        self._cols = torch.arange(q_max, device=device)

    def join(self, rows: Tensor, budgets: Tensor, eos: Tensor) -> None:
        """Start rows (n,) afresh with token budgets (n,) and EOS ids (n, MAX_EOS_IDS) (-1: none)."""
        self.budget[rows] = budgets
        self.count[rows] = 0
        self.done[rows] = budgets <= 0
        self.eos[rows] = eos

    def reset(self, lengths: Tensor, max_new_tokens: int, max_seq_len: int, eos_id: int | Sequence[int] | None) -> None:
        """Start every row: prompts of `lengths` (B,), one budget and one EOS set for all; `eos_id` is
        one id, several (a row stops at the first of any), or None."""
        rows = torch.arange(self.out.shape[0], device=self.out.device)
        eos = torch.tensor(eos_row(eos_id), dtype=torch.long, device=self.out.device).expand(len(rows), -1)
        self.join(rows, (max_seq_len - lengths).clamp(max=max_new_tokens), eos)

    def push(self, tokens: Tensor, n: Tensor) -> Tensor:
        """Append the first n (B,) of tokens (B, q) per row; return how many each row took (B,)."""
        q = tokens.shape[1]
        cols = self._cols[:q]
        n = torch.where(self.done, 0, n)
        hit = (tokens[:, :, None] == self.eos[:, None, :]).any(-1) & (cols < n[:, None])  # (B, q)
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
    """Device-side counters per row (no host sync per step): steps, emitted tokens, and a histogram
    of accepted drafts per draft length.

    ``hist[b, k, n]`` counts row b's steps that drafted k tokens (0 = a plain step) and accepted n
    of them. When the loop changes the draft length, statistics per position stay honest from
    it: position j was drafted in the steps with k >= j, tried (reached) in those with k >= j and
    n >= j-1, and accepted in those with k >= j and n >= j (`hist_counts`). Per row, so that a
    server can report each request's acceptance; the sums over rows are the batch's. A row's
    counters restart when it joins (`reset(rows)`).
    """

    def __init__(self, batch_size: int, k_max: int, device: torch.device | str) -> None:
        B, K = batch_size, max(k_max, 1)
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # steps in which some row was active
        self.row_steps = torch.zeros(B, dtype=torch.long, device=device)
        self.step_tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.hist = torch.zeros(B, K + 1, K + 1, dtype=torch.long, device=device)  # (B, draft length, accepted)
        self._n = torch.arange(K + 1, device=device)

    def reset(self, rows: Tensor | None = None) -> None:
        """Zero every counter (rows=None) or the counters of rows (n,)."""
        if rows is None:
            for t in (self.steps, self.row_steps, self.step_tokens, self.hist):
                t.zero_()
        else:
            for t in (self.row_steps, self.step_tokens, self.hist):
                t[rows] = 0

    def step(self, active: Tensor, emitted: Tensor, n_accepted: Tensor | None = None, k: int = 0) -> None:
        """Record one step of k drafts (a Python int: static): active (B,) rows, emitted (B,) tokens
        each, n_accepted (B,) drafts each (None: a plain step)."""
        self.steps.add_(active.any().long())
        self.row_steps.add_(active.long())
        self.step_tokens.add_(torch.where(active, emitted, 0))
        n = torch.zeros_like(emitted) if n_accepted is None else n_accepted
        self.hist[:, k].add_(((n[:, None] == self._n) & active[:, None]).long())


def hist_counts(hist: Sequence[Sequence[int]], K: int) -> tuple[list[int], list[int], list[int]]:
    """(drafted, tried, accepted) per draft position j = 1..K from a histogram hist[k][n] (`Tally`):
    steps that drafted position j, that reached it (position j-1 accepted), and that accepted it."""
    drafted, tried, accepted = [0] * K, [0] * K, [0] * K
    for k, row in enumerate(hist):
        for n, c in enumerate(row):
            if not c:
                continue
            for j in range(1, min(k, K) + 1):
                drafted[j - 1] += c
                tried[j - 1] += c if n >= j - 1 else 0
                accepted[j - 1] += c if n >= j else 0
    return drafted, tried, accepted


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
        self.tally = Tally(B, k, dev)
        # The fed tokens of a chain step, [x, d_1..d_k]: x (the pending token, emitted, not yet in
        # the cache) and the drafts are views into it, so a step feeds it without building it.
        self.fed = torch.zeros(B, 1 + k, dtype=torch.long, device=dev)
        self.x = self.fed[:, 0]
        self.drafts = self.fed[:, 1:]
        self.qd: Tensor | None = None  # (B, k, V) draft distributions, allocated when sampling losslessly
        self.lq: Tensor | None = None  # (B, k, V) draft logits a tree is built from
        self.rand = torch.zeros(B, rand_width, device=dev)
        # Sampling settings per row (sampling.RowSampling reads them): a step reads them by
        # address, so rows with different settings share one compiled step and one CUDA graph.
        self.temperature = torch.zeros(B, device=dev)
        self.top_k = torch.zeros(B, dtype=torch.long, device=dev)
        self.top_p = torch.ones(B, device=dev)
        self.hbuf: Tensor | None = None  # sequential drafter: depth 1's hidden input (h^0 or fused) per position (B, S, C)
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

    def set_sampling(self, rows: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> None:
        """Sampling settings of rows (n,): temperature (0 = greedy), top-k (0 = all), top-p (1 = all)."""
        self.temperature[rows] = temperature.to(self.temperature.dtype)
        self.top_k[rows] = top_k.long()
        self.top_p[rows] = top_p.to(self.top_p.dtype)

    def row_tensors(self) -> dict[str, Tensor]:
        """Every buffer with one entry per row along dim 0, by name (the KV cache's are per layer first)."""
        ts = dict(pos=self.cache.pos, out=self.emitter.out, budget=self.emitter.budget, count=self.emitter.count,
                  done=self.emitter.done, eos=self.emitter.eos, row_steps=self.tally.row_steps,
                  step_tokens=self.tally.step_tokens, hist=self.tally.hist, x=self.x, drafts=self.drafts,
                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return ts | {n: t for n, t in (("qd", self.qd), ("lq", self.lq), ("hbuf", self.hbuf), ("seq", self.seq))
                     if t is not None}

    def copy_rows(self, src: "DecodeState", src_rows: Tensor, dst_rows: Tensor, width: int) -> None:
        """Copy rows of another state of the same model (a prefill pass run apart) into rows here.

        Args:
            src: the state the rows were prefilled in (its optional buffers a subset of these).
            src_rows, dst_rows: (n,) row indices there and here.
            width: cache slots to copy (the prefill's padded prompt width; later slots are dead).
        """
        mine = self.row_tensors()
        for name, theirs in src.row_tensors().items():
            mine[name][dst_rows] = theirs[src_rows]
        for a, b in ((self.cache.k, src.cache.k), (self.cache.v, src.cache.v)):
            a[:, dst_rows, :, :width] = b[:, src_rows, :, :width]

    def small_tensors(self) -> list[Tensor]:
        """The loop state a warm-up or capture run may change and must give back (not the big buffers)."""
        ts = [self.cache.pos, self.emitter.budget, self.emitter.count, self.emitter.done, self.tally.steps,
              self.tally.row_steps, self.tally.step_tokens, self.tally.hist, self.fed, self.rand]
        return ts + [t for t in (self.qd, self.lq) if t is not None]

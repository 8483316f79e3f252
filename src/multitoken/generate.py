"""Generation: sampling, prefill, one-token decode steps, streaming, and the `generate` command.

Plain next-token decoding runs the main model only (``model(..., heads=False)``) over a static
KV cache with a position per row: `prefill` writes the prompt, then `decode_step` feeds one token
per step. Speculative decoding (speculative.py) shares everything here: the sampling helper (one
warping of the logits, used for target and draft distributions alike), the output buffer that
applies EOS and the token budget per row, and the statistics.

`generate` is the Python entry point; `TextStream` yields text as tokens are accepted; the
``multitoken generate`` subcommand streams to the terminal and prints statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from multitoken.errors import UserError
from multitoken.kv_cache import KVCache

MODES = ("ntp", "spec", "tree")


# ---- sampling ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How a distribution is drawn from logits; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = all)."""

    def __post_init__(self) -> None:
        from multitoken.checks import SAMPLING_RANGES

        # Range checks fail NaN too (a NaN temperature once sampled token 0 forever).
        for name, rng in SAMPLING_RANGES.items():
            why = rng.problem(getattr(self, name))
            if why is not None:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: Tensor, s: Sampling) -> Tensor:
    """Probabilities (..., V) after temperature, top-k and top-p (float32); one-hot when greedy."""
    logits = logits.float()
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def draw(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probabilities p (..., V) -> (...).

    Exponential-race sampling (argmax of p / E, E ~ Exp(1)) is exact, needs no host sync and
    never picks a zero-probability token.
    """
    e = torch.empty_like(p).exponential_(generator=generator)
    return (p / e).argmax(-1)


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """Tokens (...) from logits (..., V): argmax when greedy, else a draw from `probs`."""
    if s.greedy:
        return logits.argmax(-1)
    return draw(probs(logits, s), generator)


# ---- statistics ----------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """What one `generate` call did.

    tau is tokens emitted per verification step, bonus token included (1.0 for plain decoding);
    acceptance_per_position[j-1] is the fraction of (row, step) pairs in which draft position j
    was accepted. Both count the steps after prefill; new_tokens includes the prefill's token.
    """

    mode: str
    draft: int
    batch_size: int
    new_tokens: int = 0
    """Tokens generated, all rows together."""
    steps: int = 0
    """Forward passes after prefill (verification steps in speculative modes)."""
    row_steps: int = 0
    """Steps summed over rows while each row was still generating."""
    tau: float = 1.0
    acceptance_per_position: list[float] = field(default_factory=list)
    lossless: bool = True
    """False only with lossy typical acceptance at temperature > 0."""
    wall_time_s: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance_per_position)
        line = (f"{self.new_tokens} tokens in {self.wall_time_s:.2f} s ({self.tokens_per_second:.1f} tok/s), "
                f"mode={self.mode}, steps={self.steps}, tau={self.tau:.2f}" + ("" if self.lossless else " (LOSSY typical acceptance)"))
        return line + (f", acceptance per position: {acc}" if acc else "")


class Tally:
    """Device-side counters (no host sync per step), turned into `GenerationStats` at the end."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.steps = 0
        self.row_steps = torch.zeros((), dtype=torch.long, device=device)
        self.step_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.accepted = torch.zeros(max(k, 0), dtype=torch.long, device=device)  # per draft position

    def step(self, active: Tensor, emitted: Tensor, n_accepted: Tensor | None = None) -> None:
        """Record one step: active (B,) rows, emitted (B,) tokens each, n_accepted (B,) drafts each."""
        self.steps += 1
        self.row_steps += active.sum()
        self.step_tokens += emitted.sum()
        if n_accepted is not None and self.k:
            j = torch.arange(1, self.k + 1, device=active.device)
            self.accepted += ((n_accepted[:, None] >= j) & active[:, None]).sum(0)

    def finish(self, stats: GenerationStats, new_tokens: int, wall: float) -> GenerationStats:
        row_steps = int(self.row_steps)
        stats.new_tokens, stats.steps, stats.row_steps = new_tokens, self.steps, row_steps
        stats.tau = float(self.step_tokens) / row_steps if row_steps else 0.0
        stats.acceptance_per_position = [float(a) / row_steps if row_steps else 0.0 for a in self.accepted.tolist()]
        stats.wall_time_s = wall
        stats.tokens_per_second = new_tokens / wall if wall > 0 else 0.0
        return stats


# ---- prompts and output --------------------------------------------------------------------------
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
    are done take none. Everything stays on the device until `done_all` or `tokens`.
    """

    def __init__(self, lengths: Tensor, max_new_tokens: int, max_seq_len: int, q: int, eos_id: int | None) -> None:
        B, dev = lengths.shape[0], lengths.device
        self.budget = (max_seq_len - lengths).clamp(max=max_new_tokens)  # (B,)
        self.count = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = self.budget <= 0
        width = min(max(max_new_tokens, 0), max_seq_len)  # no row can take more than the context
        self.out = torch.zeros(B, width + q, dtype=torch.long, device=dev)
        self.eos_id = eos_id
        self._cols = torch.arange(q, device=dev)

    def push(self, tokens: Tensor, n: Tensor) -> Tensor:
        """Append the first n (B,) of tokens (B, q') per row; return how many each row took (B,)."""
        q = tokens.shape[1]
        cols = self._cols[:q]
        n = torch.where(self.done, 0, n)
        if self.eos_id is not None:
            hit = (tokens == self.eos_id) & (cols < n[:, None])  # (B, q)
            any_hit = hit.any(1)
            n = torch.where(any_hit, hit.int().argmax(1) + 1, n)
            self.done = self.done | any_hit
        n = torch.minimum(n, self.budget - self.count)
        idx = (self.count[:, None] + cols).clamp(max=self.out.shape[1] - 1)
        # Writes past a row's new count are overwritten later or cut off by `tokens`.
        self.out.scatter_(1, idx, tokens)
        self.count = self.count + n
        self.done = self.done | (self.count >= self.budget)
        return n

    def done_all(self) -> bool:
        return bool(self.done.all())

    def tokens(self) -> list[list[int]]:
        return [row[:c] for row, c in zip(self.out.tolist(), self.count.tolist())]


# ---- plain decoding ------------------------------------------------------------------------------
def new_cache(model, batch_size: int, extra: int = 0) -> KVCache:
    """A cache for `model` with `extra` scratch slots past the context (draft and tree nodes)."""
    p = next(model.parameters())
    return KVCache.for_model(model.config, batch_size, model.config.max_seq_len + extra, p.dtype, p.device)


def prefill(model, cache: KVCache, idx: Tensor, lengths: Tensor) -> Tensor:
    """Write right-padded prompts (B, T) into an empty cache; return next-token logits (B, V).

    Each row's position becomes its own length: the padding's cache entries lie past it and are
    overwritten before anything can attend to them.
    """
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    (h,) = model(idx, cache=cache, input_pos=pos, heads=False)
    cache.rewind(lengths)
    return model.logits(h.gather(1, (lengths - 1)[:, None, None].expand(B, 1, h.shape[-1]))[:, 0])


def decode_step(model, cache: KVCache, tokens: Tensor, active: Tensor | None = None) -> Tensor:
    """Feed one token per row (B,) at each row's position; return next-token logits (B, V).

    Rows where `active` is False are computed but not committed (their position stays).
    """
    (h,) = model(tokens[:, None], cache=cache, heads=False)
    cache.advance(1 if active is None else active.long())
    return model.logits(h[:, 0])


def _ntp_steps(model, idx: Tensor, lengths: Tensor, emitter: Emitter, tally: Tally, s: Sampling,
               gen: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
    """Plain decoding, one step at a time; yields (tokens (B, 1), taken (B,)) per step."""
    cache = new_cache(model, idx.shape[0])
    logits = prefill(model, cache, idx, lengths)
    ones = torch.ones_like(lengths)
    while True:
        tok = sample(logits, s, gen)  # (B,)
        taken = emitter.push(tok[:, None], ones)
        yield tok[:, None], taken
        if emitter.done_all():
            return
        active = ~emitter.done
        logits = decode_step(model, cache, tok, active)
        tally.step(active, active.long())


# ---- the entry point ------------------------------------------------------------------------------
def decode(model, prompt_ids, max_new_tokens: int = 64, mode: str = "ntp", draft: int | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           tree=None, eos_id: int | None = None, lossy_typical: bool = False
           ) -> tuple[Iterator[tuple[Tensor, Tensor]], Emitter, Tally, GenerationStats]:
    """Set up a decoding run; iterate the returned steps to drive it (see `generate`).

    Returns:
        (steps, emitter, tally, stats): steps yields (tokens (B, q), taken (B,)) after every
        forward pass; the emitter holds the output; tally.finish fills stats.
    """
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    s = Sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    idx, lengths = prepare_prompts(prompt_ids, model.config.max_seq_len, device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    if mode == "ntp":
        if lossy_typical:
            raise UserError("typical acceptance needs drafts: use --mode spec or --mode tree with it")
        emitter = Emitter(lengths, max_new_tokens, model.config.max_seq_len, 1, eos_id)
        tally = Tally(0, device)
        steps = _ntp_steps(model, idx, lengths, emitter, tally, s, gen)
        k = 0
    else:
        from multitoken import speculative

        steps, emitter, tally, k = speculative.setup(model, idx, lengths, max_new_tokens, mode, draft, s, gen,
                                                     tree, eos_id, lossy_typical)
    stats = GenerationStats(mode=mode, draft=k, batch_size=idx.shape[0], lossless=not (lossy_typical and not s.greedy))
    return steps, emitter, tally, stats


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int = 64, mode: str = "ntp", draft: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             tree=None, eos_id: int | None = None, lossy_typical: bool = False
             ) -> tuple[list[list[int]], GenerationStats]:
    """Generate continuations of one or several prompts.

    Args:
        model: a `Transformer` (eval mode).
        prompt_ids: (B, T) LongTensor, a list of ints, or a list of lists of different lengths.
        max_new_tokens: most tokens per row (also capped by the context).
        mode: "ntp" (plain), "spec" (chain self-speculative) or "tree" (tree self-speculative).
        draft: drafted tokens per step (default: all heads, model.depth); at most model.depth.
        temperature, top_k, top_p: sampling; temperature 0 = greedy. Speculative modes stay
            exact: greedy output equals plain greedy, sampling has plain sampling's distribution.
        seed: seeds a torch.Generator for sampling (None: the global RNG).
        tree: for mode "tree": a `trees.Tree` (static), an int (dynamic tree of that many nodes)
            or None (a dynamic tree of 16 nodes).
        eos_id: stop a row after this token (None: only the token limit stops).
        lossy_typical: Medusa's typical acceptance instead of exact verification (LOSSY: the
            output distribution changes; faster at temperature > 0).
    Returns:
        (token lists per row, without the prompt; GenerationStats).
    """
    t0 = time.perf_counter()
    steps, emitter, tally, stats = decode(model, prompt_ids, max_new_tokens, mode, draft, temperature, top_k,
                                          top_p, seed, tree, eos_id, lossy_typical)
    for _ in steps:
        pass
    out = emitter.tokens()
    return out, tally.finish(stats, sum(len(r) for r in out), time.perf_counter() - t0)


class TextStream:
    """Iterate text pieces as tokens are accepted (batch 1); `stats`, `token_ids`, `text` after.

    Stops on EOS, on any of `stop` strings (the text is cut before it) or at the token limit.
    Text that could be the start of a stop string is held back until it is clearly not.
    """

    def __init__(self, model, tokenizer, prompt: str, stop: Sequence[str] = (), **kwargs) -> None:
        ids = tokenizer.encode(prompt)
        if not ids:
            raise UserError("empty prompt: give at least one token of prompt text")
        kwargs.setdefault("eos_id", tokenizer.eos_id)
        self.model, self.tokenizer, self.ids, self.stop, self.kwargs = model, tokenizer, ids, list(stop), kwargs
        self.stats: GenerationStats | None = None
        self.token_ids: list[int] = []
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        from multitoken.data.tokenizer import StreamDecoder

        t0 = time.perf_counter()
        steps, emitter, tally, stats = decode(self.model, [self.ids], **self.kwargs)
        dec = StreamDecoder(self.tokenizer)
        eos = self.kwargs.get("eos_id")
        hold = max((len(s) for s in self.stop), default=1) - 1
        sent = 0  # characters of self.text already yielded
        stopped = False
        while True:
            with torch.no_grad():  # only around the model's work: no_grad must not leak into the caller
                item = next(steps, None)
            if item is None:
                break
            tokens, taken = item
            new = tokens[0, : int(taken[0])].tolist()
            self.token_ids += new
            self.text += dec.push([t for t in new if t != eos])
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, stopped = self.text[:cut], True
                break
            if len(self.text) - hold > sent:
                yield self.text[sent : len(self.text) - hold]
                sent = len(self.text) - hold
        if not stopped:
            self.text += dec.flush()
        if len(self.text) > sent:
            yield self.text[sent:]
        self.stats = tally.finish(stats, len(self.token_ids), time.perf_counter() - t0)


# ---- command line ----------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    from multitoken.checks import INT63, MAX_NEW_TOKENS, SAMPLING_RANGES
    from multitoken.cli import device_arg, ints, option, path_arg, text_arg
    from multitoken.config import MAX_HEAD_DEPTH

    p = subparsers.add_parser("generate", help="generate text from a run, plainly or self-speculatively")
    p.add_argument("--run", required=True, type=path_arg, help="run directory (from train, convert or a retrofit)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=path_arg, help="file holding the prompt text")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="ntp: plain; spec: chain drafts; tree: draft tree (default: spec when the run has heads, else ntp)")
    p.add_argument("--draft", type=ints(1, MAX_HEAD_DEPTH), default=None, help="drafted tokens per step (default: all heads)")
    p.add_argument("--tree", default=None, type=path_arg,
                   help="tree mode: a tree.json, or 'dynamic:N' (default: RUN_DIR/tree.json if present, else dynamic:16)")
    p.add_argument("--temperature", type=option(SAMPLING_RANGES["temperature"]), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=option(SAMPLING_RANGES["top_k"]), default=0)
    p.add_argument("--top-p", type=option(SAMPLING_RANGES["top_p"]), default=1.0)
    p.add_argument("--seed", type=ints(0, INT63), default=None)
    p.add_argument("--max-new-tokens", type=ints(1, MAX_NEW_TOKENS), default=128)
    p.add_argument("--stop", action="append", default=[], type=text_arg, help="stop string (repeatable)")
    p.add_argument("--typical", "--typical-lossy", dest="typical", action="store_true",
                   help="LOSSY Medusa typical acceptance: faster at temperature > 0, changes the output distribution")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from multitoken.checkpoint import load_run

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} not found: give an existing text file")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    if not prompt:
        raise UserError("empty prompt: give at least one character of prompt text")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_run(args.run, device=args.device, dtype=dtype)
    if args.mode is None:
        args.mode = "spec" if model.depth else "ntp"
    tree = None
    if args.mode == "tree":
        from multitoken.trees import resolve_tree

        tree = resolve_tree(args.tree, args.run)
    stream = TextStream(model, tokenizer, prompt, stop=args.stop, max_new_tokens=args.max_new_tokens, mode=args.mode,
                        draft=args.draft, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, tree=tree, lossy_typical=args.typical)
    if args.json:
        for _ in stream:
            pass
        st = stream.stats
        print(json.dumps({"text": stream.text, "token_ids": stream.token_ids, "tau": st.tau,
                          "acceptance_per_position": st.acceptance_per_position,
                          "tokens_per_second": st.tokens_per_second, "steps": st.steps, "stats": st.to_dict()}))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stream.stats.summary(), file=sys.stderr)
    return 0

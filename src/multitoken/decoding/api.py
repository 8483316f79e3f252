"""The `generate` API: one engine per model and batch size, decoding loops with few host syncs, streaming.

`generate` decodes one or several prompts plainly ("ntp"), with chain drafts ("spec") or with a
draft tree ("tree"); speculative output is identical to plain greedy decoding, or has exactly
plain sampling's distribution. The first call for a model and batch size builds an `Engine`
(decode state, runner, strategies) that later calls reuse, so buffers, compiled steps and
CUDA graphs are made once.

Host syncs: the loop keeps a bound on every row's position on the host, so it needs the device
only to learn whether all rows are done. Plain decoding without EOS knows that from the token
budget and never syncs before the end; otherwise the loop checks every `sync_every` steps (8 on
CUDA, every step on the CPU, where a check costs nothing). Streaming reads new tokens at those
same points.

Draft length: with `draft=None` on a runner that measures step costs (CUDA graphs, or timed
steps on the CPU), the loop
picks, at each check, the number of drafts k' (0 = plain decoding) that maximises expected
tokens per second, (1 + sum_{j<=k'} acceptance_j) / cost(k'), from the acceptance measured so
far and the measured cost of each step; `GenerationStats.chosen_draft` says what it chose.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from multitoken.decoding.runner import Runner, bucket
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.state import DecodeState, prepare_prompts
from multitoken.decoding.strategies import Chain, Plain, Tree
from multitoken.errors import BadValue, UserError

MODES = ("ntp", "spec", "tree")
DEFAULT_SCRATCH = 65  # cache slots past the context: a 64-node tree (or 64 drafts) plus one
PREFILL_BUCKET = 16  # prompts are right-padded to a multiple of this (prefill compiles per width)


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
    """Forward passes after prefill in which some row was still generating."""
    row_steps: int = 0
    """Steps summed over rows while each row was still generating."""
    tau: float = 1.0
    acceptance_per_position: list[float] = field(default_factory=list)
    lossless: bool = True
    """False only with lossy typical acceptance at temperature > 0."""
    wall_time_s: float = 0.0
    tokens_per_second: float = 0.0
    chosen_draft: list[int] = field(default_factory=list)
    """The draft lengths the loop ran, in order (0 = plain steps); one entry when it never changed."""
    compile_time_s: float = 0.0
    """Seconds this call spent compiling blocks and capturing graphs (included in wall_time_s)."""
    host_syncs: int = 0
    """Times the loop read the device to decide whether to go on."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance_per_position)
        line = (f"{self.new_tokens} tokens in {self.wall_time_s:.2f} s ({self.tokens_per_second:.1f} tok/s), "
                f"mode={self.mode}, steps={self.steps}, tau={self.tau:.2f}" + ("" if self.lossless else " (LOSSY typical acceptance)"))
        return line + (f", acceptance per position: {acc}" if acc else "")


class Engine:
    """Decode state, runner and strategies for one model at one batch size (see the module docstring)."""

    def __init__(self, model, batch_size: int, scratch: int, compile: bool | None, graphs: bool | None) -> None:
        k = max(model.depth, 1)
        self.state = DecodeState(model, batch_size, scratch, rand_width=max(2 * k + 1, scratch))
        self.runner = Runner(self.state, compile=compile, graphs=graphs)
        self.model = model
        self.fingerprint = _fingerprint(model)
        self._strategies: dict = {}

    def strategy(self, mode: str, k: int, s: Sampling, tree=None, typical: bool = False):
        key = (mode, k, s, repr(tree), typical)
        st = self._strategies.get(key)
        if st is None:
            if mode == "ntp" or k == 0:
                st = Plain(self.model, self.state, s)
            elif mode == "spec":
                st = Chain(self.model, self.state, s, k, typical)
            else:
                st = Tree(self.model, self.state, s, tree, typical)
            self._strategies[key] = st
        return st


def _fingerprint(model) -> tuple:
    """Where the weights live: a captured graph reads them by address, so new tensors need a new engine."""
    return tuple(p.data_ptr() for p in model.parameters()) + (next(model.parameters()).dtype,)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, batch_size: int, scratch: int = 0, compile: bool | None = None, graphs: bool | None = None) -> Engine:
    """The engine for (model, batch size), built on first use and rebuilt only when it cannot serve.

    compile, graphs: None = the device's default (both on CUDA, neither on the CPU).
    """
    cuda = next(model.parameters()).device.type == "cuda"
    compile = cuda if compile is None else compile
    graphs = cuda if graphs is None else (graphs and cuda)
    per = _ENGINES.setdefault(model, {})
    e = per.get(batch_size)
    if (e is None or e.state.scratch < scratch or e.runner.compile != compile or e.runner.graphs != graphs
            or e.fingerprint != _fingerprint(model)):
        per.pop(batch_size, None)
        e = per[batch_size] = Engine(model, batch_size, max(scratch, DEFAULT_SCRATCH), compile, graphs)
    return e


def check_draft(model, draft: int | None) -> int:
    """The number of drafted tokens: `draft`, or all heads; a one-line error when impossible."""
    if model.depth == 0:
        raise UserError("speculative decoding needs MTP heads and this model has none: use --mode ntp, or train with --heads KIND:N")
    k = model.depth if draft is None else draft
    if not 1 <= k <= model.depth:
        raise BadValue("draft", k, f"this model has {model.depth} MTP head(s), so draft between 1 and {model.depth}")
    return k


def decode(model, prompt_ids, max_new_tokens: int = 64, mode: str = "ntp", draft: int | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           tree=None, eos_id: int | None = None, lossy_typical: bool = False, compile: bool | None = None,
           graphs: bool | None = None, sync_every: int | None = None, stream: bool = False
           ) -> tuple[Iterator[list[list[int]]], Engine, GenerationStats]:
    """Set up a decoding run; iterate the returned pieces to drive it (see `generate`).

    Returns:
        (pieces, engine, stats): with stream=True, pieces yields the new tokens of every row
        since the last piece; the engine's emitter holds the output; `finish` fills stats.
    """
    if mode not in MODES:
        raise BadValue("mode", repr(mode), f"choose one of {', '.join(MODES)}")
    from multitoken.checks import MAX_NEW_TOKENS

    if not (isinstance(max_new_tokens, int) and 1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise BadValue("max_new_tokens", repr(max_new_tokens), f"must be an integer between 1 and {MAX_NEW_TOKENS}")
    s = Sampling(temperature, top_k, top_p)
    device = next(model.parameters()).device
    L = model.config.max_seq_len
    idx, lengths = prepare_prompts(prompt_ids, L, device)
    B = idx.shape[0]
    if mode == "ntp" and lossy_typical:
        raise UserError("typical acceptance needs drafts: use --mode spec or --mode tree with it")
    t = None
    if mode == "ntp":
        k, q = 0, 1
    elif mode == "spec":
        k = check_draft(model, draft)
        q = k + 1
    else:
        from multitoken.decoding.trees import as_tree

        check_draft(model, draft)
        t = as_tree(tree, draft, model.depth)
        k, q = t.depth, t.nodes
    engine = engine_for(model, B, q + 1, compile, graphs)
    st, runner = engine.state, engine.runner
    if not s.greedy and mode == "spec" and not lossy_typical:
        st.ensure_sampling_buffers(model.depth)
    if mode == "tree":
        st.ensure_tree_buffers(model.depth)
    strategy = engine.strategy(mode, k, s, t, lossy_typical)
    auto = draft is None and k > 0 and runner.measures_costs
    stats = GenerationStats(mode=mode, draft=k, batch_size=B, lossless=not (lossy_typical and not s.greedy))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    sync_every = sync_every or (8 if device.type == "cuda" else 1)
    compile_before = runner.compile_time_s  # read before prefill: the first compilation happens there
    st.emitter.reset(lengths, max_new_tokens, L, eos_id)
    st.tally.reset()
    len_host = lengths.tolist()
    max_budget = max(min(max_new_tokens, L - n) for n in len_host)

    def pieces() -> Iterator[list[list[int]]]:
        nonlocal strategy
        sent = [0] * B
        chosen = [strategy.k]

        def new_tokens() -> list[list[int]]:
            counts = st.emitter.count.tolist()
            hi = max(counts)
            rows = st.emitter.out[:, :hi].tolist()
            out = [row[a:c] for row, a, c in zip(rows, sent, counts)]
            sent[:] = counts
            return out

        if not s.greedy:
            st.rand.uniform_(generator=gen)
        T = -(-idx.shape[1] // PREFILL_BUCKET) * PREFILL_BUCKET
        padded = torch.zeros(B, min(T, L), dtype=torch.long, device=device)
        padded[:, : idx.shape[1]] = idx
        st.cache.live = bucket(padded.shape[1] + 1, st.cache.max_seq_len)
        strategy.prefill(padded, lengths)
        maxpos, since, steps = max(len_host), 0, 0
        syncs = 0
        if stream:
            yield new_tokens()
        periodic = strategy.k > 0 or eos_id is not None or stream
        done = max_budget <= 1
        if not done and periodic and device.type != "cuda":
            done = bool(st.emitter.done.all())
            syncs += 1
        while not done:
            if not s.greedy:
                st.rand.uniform_(generator=gen)
            runner.step(strategy, maxpos + (since + 1) * (strategy.k + 1) + strategy.q)
            since += 1
            steps += 1
            if 1 + steps >= max_budget:  # every active step emits >= 1 token per row: all rows are done
                break
            if periodic and since >= sync_every:
                # One read of the device: done, the largest position, and the acceptance so far.
                flag, mp, row_steps, *acc = torch.cat([st.emitter.done.all().long()[None], st.cache.pos.max()[None],
                                                       st.tally.row_steps[None], st.tally.accepted]).tolist()
                syncs += 1
                maxpos, since, done = mp, 0, bool(flag)
                if auto and not done and strategy.k and syncs % max(1, 8 // sync_every) == 0:  # about every 8 steps
                    strategy = choose_draft(engine, strategy, mode, s, t, lossy_typical, maxpos, row_steps, acc)
                    if strategy.k != chosen[-1]:
                        chosen.append(strategy.k)
                        # Plain steps from here on: without EOS or streaming nothing needs a check.
                        periodic = strategy.k > 0 or eos_id is not None or stream
                if stream and not done:
                    yield new_tokens()
        stats.chosen_draft = chosen
        stats.host_syncs = syncs + 1
        stats.compile_time_s = runner.compile_time_s - compile_before
        if stream:
            yield new_tokens()

    return pieces(), engine, stats


def best_draft(acceptance: list[float], costs: dict[int, float]) -> int:
    """The draft length with the most expected tokens per second.

    Args:
        acceptance: acceptance[j-1] = fraction of row-steps in which draft position j was accepted.
        costs: measured seconds per step for each candidate draft length (0 = a plain step).
    Returns:
        argmax over k of (1 + sum_{j<=k} acceptance[j-1]) / costs[k] (the shortest on ties).
    """
    rate = {k: (1 + sum(acceptance[:k])) / c for k, c in sorted(costs.items()) if c and c > 0}
    return max(rate, key=lambda k: (rate[k], -k))


def choose_draft(engine: Engine, current, mode: str, s: Sampling, tree, typical: bool, maxpos: int, row_steps: int,
                 accepted: list[int]):
    """The strategy `best_draft` picks from the acceptance so far and the measured step costs.

    Never goes back from plain steps: drafts made before a plain stretch are stale, and lossless
    sampling needs drafts drawn from the q it holds. A tree competes with plain steps only.
    """
    runner, K = engine.runner, current.k
    if K == 0 or row_steps < 8:
        return current
    acceptance = [x / row_steps for x in accepted[:K]]
    if mode == "tree":
        options = {K: current, 0: engine.strategy("ntp", 0, s)}
        acceptance = [sum(acceptance)] + [0.0] * (K - 1)  # the tree's tokens per step, as one "position"
        costs = {0: runner.cost(options[0], maxpos + 9), K: runner.cost(current, maxpos + current.q + 8 * (K + 1))}
    else:
        options = {j: (engine.strategy("spec", j, s, None, typical) if j else engine.strategy("ntp", 0, s))
                   for j in range(K + 1)}
        costs = {j: runner.cost(o, maxpos + o.q + 8 * (j + 1)) for j, o in options.items()}
    if any(c is None for c in costs.values()):
        return current
    return options[best_draft(acceptance, costs)]


def finish(engine: Engine, stats: GenerationStats, wall: float) -> tuple[list[list[int]], GenerationStats]:
    """The output token lists and the filled statistics (one read of the device)."""
    out = engine.state.emitter.tokens()
    K = max(stats.chosen_draft) if stats.chosen_draft else stats.draft
    steps, row_steps, step_tokens, acc = engine.state.tally.read(K)
    stats.new_tokens, stats.steps, stats.row_steps = sum(len(r) for r in out), steps, row_steps
    stats.tau = step_tokens / row_steps if row_steps else 0.0
    stats.acceptance_per_position = [x / row_steps if row_steps else 0.0 for x in acc] if stats.draft else []
    stats.wall_time_s = wall
    stats.tokens_per_second = stats.new_tokens / wall if wall > 0 else 0.0
    return out, stats


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int = 64, mode: str = "ntp", draft: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             tree=None, eos_id: int | None = None, lossy_typical: bool = False, compile: bool | None = None,
             graphs: bool | None = None, sync_every: int | None = None) -> tuple[list[list[int]], GenerationStats]:
    """Generate continuations of one or several prompts.

    Args:
        model: a `Transformer` (eval mode).
        prompt_ids: (B, T) LongTensor, a list of ints, or a list of lists of different lengths.
        max_new_tokens: most tokens per row (also capped by the context).
        mode: "ntp" (plain), "spec" (chain self-speculative) or "tree" (tree self-speculative).
        draft: drafted tokens per step, at most model.depth. None: all heads, and where step costs
            are measured (CUDA graphs, the CPU) the loop may run fewer (0 included) where they pay more.
        temperature, top_k, top_p: sampling; temperature 0 = greedy. Speculative modes stay
            exact: greedy output equals plain greedy, sampling has plain sampling's distribution.
        seed: seeds a torch.Generator for sampling (None: the global RNG).
        tree: for mode "tree": a `trees.StaticTree`, a `trees.DynamicTree`, an int (dynamic tree
            of that many nodes) or None (a dynamic tree of 16 nodes).
        eos_id: stop a row after this token (None: only the token limit stops).
        lossy_typical: Medusa's typical acceptance instead of exact verification (LOSSY).
        compile: torch.compile the model's blocks for decoding (default: on CUDA; cached on disk).
        graphs: capture steps as CUDA graphs (default: on CUDA).
        sync_every: steps between checks of "all rows done?" (default 8 on CUDA, 1 on the CPU).
    Returns:
        (token lists per row, without the prompt; GenerationStats).
    """
    t0 = time.perf_counter()
    pieces, engine, stats = decode(model, prompt_ids, max_new_tokens, mode, draft, temperature, top_k, top_p, seed,
                                   tree, eos_id, lossy_typical, compile, graphs, sync_every)
    for _ in pieces:
        pass
    return finish(engine, stats, time.perf_counter() - t0)


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
        with torch.no_grad():
            pieces, engine, stats = decode(self.model, [self.ids], stream=True, **self.kwargs)
        dec = StreamDecoder(self.tokenizer)
        eos = self.kwargs.get("eos_id")
        hold = max((len(s) for s in self.stop), default=1) - 1
        sent = 0  # characters of self.text already yielded
        stopped = False
        while True:
            with torch.no_grad():  # only around the model's work: no_grad must not leak into the caller
                item = next(pieces, None)
            if item is None:
                break
            new = item[0]
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
        _, self.stats = finish(engine, stats, time.perf_counter() - t0)
        self.stats.new_tokens = len(self.token_ids)
        wall = self.stats.wall_time_s
        self.stats.tokens_per_second = self.stats.new_tokens / wall if wall > 0 else 0.0

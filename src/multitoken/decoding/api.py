"""The decoding API: an `Engine` per model and batch size, `Generation`s that rows join and leave, `generate`.

An `Engine` holds the decode state, runner and strategies for one model at one batch size (B
slots), so buffers, compiled blocks and CUDA graphs are made once and reused. `Engine.start`
begins a `Generation` over some prompts; more rows may `add` themselves while it runs, and a row
that finishes (or is cancelled) frees its slot for the next one: continuous batching, which
`multitoken serve` runs on. Sampling settings are per row (temperature, top-k and top-p live as
tensors in the state and are not part of any step's key; a row may bring its own seed).
`generate` and `TextStream` are short loops over a generation; `engines(model)` is the small
cache of engines they use, kept on the model object.

A call to `Generation.step()` does one of two things: it prefills the rows waiting for a slot
(one pass: in place over the whole batch when no row is decoding, otherwise in a side state of
the group's size whose rows are then copied into the free slots), or it decodes until the next
host check. Speculative output is identical to plain greedy decoding, or has exactly plain
sampling's distribution, row by row, whatever the other rows of the batch do.

Host syncs: the loop keeps a bound on every row's position on the host, so it needs the device
only to learn which rows are done. Plain decoding without EOS knows that from the token budget
and never syncs before the end; otherwise the loop checks every `sync_every` steps (8 on CUDA,
every step on the CPU, where a check costs nothing). A check is one read of the device (done
flags, counts, statistics and, when streaming, the new tokens).

Draft length: with `draft=None` on a runner that measures step costs (CUDA graphs, or timed
steps on the CPU), the loop asks the engine's `draft_policy.DraftPolicy` about every 8 steps for
the number of drafts k' (0 = plain decoding) with the most expected tokens per second, from the
acceptance measured per position and the measured cost of each step, and probes out of plain
steps now and then; before a longer draft runs, the drafters catch up on what the shorter steps
did not keep (`_Drafting.resume`). `GenerationStats.chosen_draft` says what it chose.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from multitoken.decoding.inputs import check_decode_options
from multitoken.decoding.draft_policy import DraftPolicy
from multitoken.decoding.runner import Runner, backend, bucket
from multitoken.decoding.sampling import RowSampling, Sampling
from multitoken.decoding.state import DecodeState, eos_ids, eos_row, hist_counts, prepare_prompts
from multitoken.decoding.strategies import Chain, Plain, Tree
from multitoken.decoding.text import StopText
from multitoken.errors import BadValue, UserError

MODES = ("ntp", "spec", "tree")
DEFAULT_SCRATCH = 65  # cache slots past the context: a 64-node tree (or 64 drafts) plus one
PREFILL_BUCKET = 16  # prompts are right-padded to a multiple of this (prefill compiles per width)


@dataclass
class GenerationStats:
    """What one generation did.

    tau is tokens emitted per verification step, bonus token included (1.0 for plain decoding);
    acceptance_per_position[j-1] is the fraction of the (row, step) pairs that drafted position j
    in which it was accepted (with draft=None, steps of a shorter draft and plain steps do not
    count for it). Both count the steps after prefill; new_tokens includes the prefill's token.
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
    step_tokens: int = 0
    """Tokens the steps after prefill emitted, all rows together (tau's numerator; row_steps its denominator)."""
    drafted: list[int] = field(default_factory=list)
    """Per position, the (row, step) pairs that drafted it (acceptance_per_position's denominators)."""
    accepted: list[int] = field(default_factory=list)
    """Per position, those in which it was accepted (the numerators)."""
    lossless: bool = True
    """False only with lossy typical acceptance at temperature > 0."""
    wall_time_s: float = 0.0
    tokens_per_second: float = 0.0
    chosen_draft: list[int] = field(default_factory=list)
    """The draft lengths the loop ran, in order (0 = plain steps); one entry when it never changed."""
    compile_time_s: float = 0.0
    """Seconds this call spent compiling blocks and capturing graphs (included in wall_time_s)."""
    host_syncs: int = 0
    """Times the loop read the device."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def combine(cls, parts: Sequence["GenerationStats"]) -> "GenerationStats":
        """The statistics of several generations as one (a prompt set decoded group by group): tau and
        acceptance from the summed counts, not an average of ratios, and never the last part's alone."""
        first = parts[0]
        K = max(len(p.drafted) for p in parts)
        drafted = [sum(p.drafted[j] for p in parts if j < len(p.drafted)) for j in range(K)]
        accepted = [sum(p.accepted[j] for p in parts if j < len(p.accepted)) for j in range(K)]
        row_steps, step_tokens = sum(p.row_steps for p in parts), sum(p.step_tokens for p in parts)
        new_tokens, wall = sum(p.new_tokens for p in parts), sum(p.wall_time_s for p in parts)
        chosen = [k for p in parts for k in p.chosen_draft]
        return cls(mode=first.mode, draft=first.draft, batch_size=sum(p.batch_size for p in parts), new_tokens=new_tokens,
                   steps=sum(p.steps for p in parts), row_steps=row_steps,
                   tau=step_tokens / row_steps if row_steps else 0.0,
                   acceptance_per_position=[a / d if d else 0.0 for a, d in zip(accepted, drafted)],
                   step_tokens=step_tokens, drafted=drafted, accepted=accepted, lossless=all(p.lossless for p in parts),
                   wall_time_s=wall, tokens_per_second=new_tokens / wall if wall > 0 else 0.0,
                   chosen_draft=[k for i, k in enumerate(chosen) if i == 0 or k != chosen[i - 1]],
                   compile_time_s=sum(p.compile_time_s for p in parts), host_syncs=sum(p.host_syncs for p in parts))

    def summary(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance_per_position)
        line = (f"{self.new_tokens} tokens in {self.wall_time_s:.2f} s ({self.tokens_per_second:.1f} tok/s), "
                f"mode={self.mode}, steps={self.steps}, tau={self.tau:.2f}" + ("" if self.lossless else " (LOSSY typical acceptance)"))
        return line + (f", acceptance per position: {acc}" if acc else "")


@dataclass(frozen=True)
class Settings:
    """How a generation decodes; its rows share these (sampling may differ per row: `Generation.add`)."""

    max_new_tokens: int = 64
    """Most tokens per row (also capped by the context); a row may ask for fewer."""
    mode: str = "ntp"
    """"ntp" (plain), "spec" (chain self-speculative) or "tree" (tree self-speculative)."""
    draft: int | None = None
    """Drafted tokens per step (None: all heads, and where step costs are measured the loop may choose fewer)."""
    tree: object = None
    """For mode "tree": a StaticTree, a DynamicTree, a node count, or None (16 nodes)."""
    eos_id: int | Sequence[int] | None = None
    """A row stops after this token, or after any of several (None: only its budget stops it)."""
    lossy_typical: bool = False
    """Medusa's typical acceptance instead of exact verification (LOSSY when sampling)."""
    sync_every: int | None = None
    """Steps between host checks (None: 8 on CUDA, 1 elsewhere)."""
    stream: bool = False
    """Read new tokens at every check (`Generation.new_tokens`), not only when rows finish."""
    sampling: Sampling = Sampling()
    """Rows' sampling unless `add` gives their own."""
    seed: int | None = None
    """Seeds the generator shared by rows without a seed of their own (None: the global RNG)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadValue("mode", repr(self.mode), f"choose one of {', '.join(MODES)}")
        check_max_new_tokens(self.max_new_tokens)
        for name in ("lossy_typical", "stream"):
            if not isinstance(getattr(self, name), bool):
                raise BadValue(name, repr(getattr(self, name)), "must be True or False")
        if self.sync_every is not None and (isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int)
                                            or not 1 <= self.sync_every <= 1024):
            raise BadValue("sync_every", repr(self.sync_every), "must be a whole number of steps from 1 to 1024, or None")
        if not isinstance(self.sampling, Sampling):
            raise BadValue("sampling", repr(self.sampling), "give a multitoken.decoding.Sampling(temperature, top_k, top_p)")


@dataclass
class Request:
    """One row of a generation, as the host sees it."""

    rid: int
    prompt: list[int]
    sampling: Sampling
    budget: int
    """Tokens this row may generate."""
    generator: torch.Generator | None
    """Its own seeded generator, or None (the generation's shared one)."""
    slot: int = -1
    joined_at: int = 0
    """The generation's step count when this row was prefilled."""
    tokens: list[int] = field(default_factory=list)
    """Generated so far (as last read from the device)."""
    unread: int = 0
    """Tokens already returned by `Generation.new_tokens`."""
    count: int = 0
    """Tokens emitted as of the last check (the prefill's one from the start)."""
    done: bool = False
    finish_reason: str | None = None
    """"stop" (EOS), "length" (budget) or "cancelled"."""
    row_steps: int = 0
    step_tokens: int = 0
    k: int = 0
    """The generation's longest draft (positions reported)."""
    hist: list[list[int]] = field(default_factory=list)
    """hist[k'][n]: this row's steps that drafted k' tokens (0 = plain) and accepted n (`state.Tally`)."""

    @property
    def tau(self) -> float:
        """Tokens per step, bonus included (after prefill)."""
        return self.step_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def draft_steps(self) -> int:
        """This row's steps that verified drafts (row_steps less its plain ones, when the loop chose those)."""
        return sum(sum(row) for row in self.hist[1:])

    @property
    def drafted(self) -> int:
        """Drafted tokens verified for this row (its steps times each one's draft length)."""
        return sum(k * sum(row) for k, row in enumerate(self.hist))

    @property
    def accepted(self) -> list[int]:
        """Steps in which draft position j was accepted, j = 1..k."""
        return hist_counts(self.hist, self.k)[2]

    @property
    def acceptance_per_position(self) -> list[float]:
        """Position j's acceptance over the steps that drafted it (steps of a shorter draft, or
        plain ones, chosen by the loop, do not count)."""
        drafted, _, accepted = hist_counts(self.hist, self.k)
        return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def check_draft(model, draft: int | None) -> int:
    """The number of drafted tokens: `draft`, or all heads; a one-line error when impossible."""
    if model.depth == 0:
        raise UserError("speculative decoding needs MTP heads and this model has none: use --mode ntp, or train with --heads KIND:N")
    k = model.depth if draft is None else draft
    if not 1 <= k <= model.depth:
        raise BadValue("draft", k, f"this model has {model.depth} MTP head(s), so draft between 1 and {model.depth}")
    return k


def check_max_new_tokens(n) -> int:
    from multitoken.checks import MAX_NEW_TOKENS

    if isinstance(n, bool) or not (isinstance(n, int) and 1 <= n <= MAX_NEW_TOKENS):
        raise BadValue("max_new_tokens", repr(n), f"must be an integer between 1 and {MAX_NEW_TOKENS}")
    return n


def plan(model, settings: Settings) -> tuple[int, int, object]:
    """(draft positions k, fed tokens per step q, tree or None) for `settings`; one-line errors when impossible."""
    if settings.mode not in MODES:
        raise BadValue("mode", repr(settings.mode), f"choose one of {', '.join(MODES)}")
    check_max_new_tokens(settings.max_new_tokens)
    if settings.mode == "ntp":
        if settings.lossy_typical:
            raise UserError("typical acceptance needs drafts: use --mode spec or --mode tree with it")
        return 0, 1, None
    if settings.mode == "spec":
        k = check_draft(model, settings.draft)
        return k, k + 1, None
    from multitoken.decoding.trees import as_tree

    check_draft(model, settings.draft)
    t = as_tree(settings.tree, settings.draft, model.depth)
    return t.depth, t.nodes, t


def _fingerprint(model) -> tuple:
    """Where the weights live: a captured graph reads them by address, so new tensors need a new engine."""
    return tuple(p.data_ptr() for p in model.parameters()) + (next(model.parameters()).dtype,)


class Engine:
    """Decode state, runner and strategies for one model at one batch size (see the module docstring).

    Args:
        model: a `Transformer` (eval mode).
        batch_size: rows decoded together (slots).
        scratch: cache slots past the context (the largest step's fed tokens plus one).
        compile, graphs: compiled blocks and CUDA graphs; None = the device's default (`runner.backend`).
    """

    def __init__(self, model, batch_size: int, scratch: int = DEFAULT_SCRATCH, compile: bool | None = None,
                 graphs: bool | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1 << 16:
            raise BadValue("batch_size", repr(batch_size), "must be a whole number of rows from 1 to 65536")
        k = max(model.depth, 1)
        self.model, self.batch_size = model, batch_size
        self.state = DecodeState(model, batch_size, scratch, rand_width=max(2 * k + 1, scratch))
        self.runner = Runner(self.state, compile=compile, graphs=graphs)
        self.fingerprint = _fingerprint(model)
        self.generation: Generation | None = None
        """The generation that owns the state now (starting another one ends it)."""
        self.lock = threading.RLock()
        """Held by `generate` for a whole call: threads that share a model's engines take turns on
        one engine instead of ending each other's generation."""
        self._strategies: dict = {}
        self._side: dict[int, Engine] = {}  # group size -> an engine that prefills joining rows apart
        self.policies: dict = {}
        """(sampling, typical) -> the `DraftPolicy` of chains with draft=None: what one generation
        measured, the next starts from (the exploration is paid once per engine and settings)."""

    def strategy(self, mode: str, k: int, s: Sampling | RowSampling, tree=None, typical: bool = False,
                 switching: bool = False):
        """The strategy for a step kind (made once). `switching`: the loop may change the draft
        length, so plain and chain steps keep every draft state valid (`Plain`, `Chain`)."""
        key = ("ntp", 0, s, switching) if mode == "ntp" or k == 0 else (mode, k, s, repr(tree), typical, switching)
        st = self._strategies.get(key)
        if st is None:
            if mode == "ntp" or k == 0:
                st = Plain(self.model, self.state, s, record=switching)
            elif mode == "spec":
                st = Chain(self.model, self.state, s, k, typical, switching)
            else:
                st = Tree(self.model, self.state, s, tree, typical)
            self._strategies[key] = st
        return st

    def side(self, size: int) -> "Engine":
        """The engine that prefills `size` joining rows apart from the decoding batch (made once)."""
        e = self._side.get(size)
        if e is None:
            e = self._side[size] = Engine(self.model, size, self.state.scratch, compile=False, graphs=False)
            e.state.cache.block_fn = self.state.cache.block_fn  # the same compiled block, if any
        return e

    def serves(self, scratch: int, compile: bool | None, graphs: bool | None) -> bool:
        """Whether this engine can run a call with these needs (weights still where they were)."""
        c, g = backend(self.state.device, compile, graphs)
        return (self.state.scratch >= scratch and self.runner.compile == c and self.runner.graphs == g
                and self.fingerprint == _fingerprint(self.model))

    def start(self, prompts=(), settings: Settings = Settings()) -> "Generation":
        """Begin a generation over `prompts` (token lists; more may join later with `Generation.add`).

        Args:
            prompts: a (B, T) LongTensor, a list of ints, or a list of token lists; may be empty.
            settings: how to decode (`Settings`).
        Returns:
            the `Generation`; drive it with `step()` until `done`.
        """
        V = self.model.config.vocab_size
        check_decode_options(V, settings.draft, settings.seed, settings.eos_id)
        gen = Generation(self, settings)
        if isinstance(prompts, Tensor) or len(prompts):
            idx, lengths = prepare_prompts(prompts, self.model.config.max_seq_len, vocab_size=V)
            for row, n in zip(idx.tolist(), lengths.tolist()):
                gen.add(row[:n])
        return gen


class Engines:
    """A model's engines by batch size, rebuilt only when one cannot serve a call (`engines(model)`).

    Thread-safe: a lock covers looking an engine up and making one, so threads that ask for the
    same batch size at once get the same engine (never two, one of them dropped from the dict).
    """

    def __init__(self) -> None:
        self._by_size: dict[int, Engine] = {}
        self._lock = threading.Lock()

    def get(self, model, batch_size: int, scratch: int = 0, compile: bool | None = None,
            graphs: bool | None = None) -> Engine:
        with self._lock:
            e = self._by_size.get(batch_size)
            if e is None or not e.serves(scratch, compile, graphs):
                self._by_size.pop(batch_size, None)
                e = self._by_size[batch_size] = Engine(model, batch_size, max(scratch, DEFAULT_SCRATCH), compile, graphs)
            return e

    def __deepcopy__(self, memo) -> "Engines":  # a copied model decodes with engines of its own
        return Engines()

    def __getstate__(self) -> dict:
        return {"_by_size": {}}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


_ENGINES_LOCK = threading.Lock()
"""Guards making a model's `Engines` (two threads must not each attach their own)."""


def engines(model) -> Engines:
    """The engines kept on `model` (made on first use; they go when the model goes). Thread-safe."""
    e = model.__dict__.get("_decoding_engines")
    if e is None:
        with _ENGINES_LOCK:
            e = model.__dict__.get("_decoding_engines")
            if e is None:
                e = model.__dict__["_decoding_engines"] = Engines()
    return e


def engine_for(model, batch_size: int, scratch: int = 0, compile: bool | None = None, graphs: bool | None = None) -> Engine:
    """`engines(model).get(...)`: the engine `generate` uses for this batch size."""
    return engines(model).get(model, batch_size, scratch, compile, graphs)


class Generation:
    """Rows decoding together on one engine; rows join (`add`) and leave (finish, `cancel`) between steps.

    Drive it with `step()` until `done`; `new_tokens()` gives what each row produced since the
    last call (with `Settings.stream`, after every check), `result()` the token lists and stats.
    """

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings, self.model = engine, settings, engine.model
        self.k, self.q, self.tree = plan(engine.model, settings)
        if engine.state.scratch < self.q + 1:
            raise UserError(f"this engine has {engine.state.scratch} scratch slots and a step feeds {self.q} tokens: "
                            "build the Engine with scratch >= q + 1")
        st, dev = engine.state, engine.state.device
        if settings.mode == "tree":
            st.ensure_tree_buffers(self.model.depth)
        self.typical = settings.lossy_typical
        self.mode_now, self.k_now = settings.mode, self.k  # what the loop runs now (auto may shorten it)
        self.chosen = [self.k]
        self.auto = settings.draft is None and self.k > 0 and engine.runner.measures_costs
        self.policy: DraftPolicy | None = None  # the engine's for these settings, or made with the first strategy
        if self.auto and settings.mode == "spec":
            self.policy = engine.policies.get((settings.sampling, self.typical))
            if self.policy is not None and self.policy.current is not None and (self.policy.current or self.policy.resumable):
                self.k_now = self.policy.current  # where the last generation left it (plain included: probes follow)
                self.mode_now = settings.mode if self.k_now else "ntp"
                self.chosen = [self.k_now]
        self._stale: dict[int, int] = {}
        """slot -> the first position from which the row's deeper drafting state (modules past the
        running length, or all of them after plain steps) was not kept: what a longer draft
        rewrites first (`_Drafting.resume`)."""
        self.choose_every = 8
        """Steps between draft-length choices (with `draft=None` where step costs are measured)."""
        self._chosen_at = 0  # the loop step at which the draft length was last chosen (or reset)
        self._probe_at: int | None = None  # while plain: the step at which a probe is due
        self._observed = 0  # the loop step up to which the policy has seen the statistics
        if self.k_now == 0 and self.policy is not None:
            self._probe_at = self.policy.steps_to_probe()
        self.sync_every = settings.sync_every or (8 if dev.type == "cuda" else 1)
        # On the CPU a check is cheap but not free (a small tiny-model step costs a few of them):
        # rows that stop only at their budget are checked when one of them may have spent it, and
        # at least every 8 steps (the draft-length choice), never later than a check every step would.
        self.paced = (settings.sync_every is None and dev.type != "cuda" and settings.eos_id is None
                      and not settings.stream)
        self.shared_gen: torch.Generator | None = None
        if settings.seed is not None:
            self.shared_gen = torch.Generator(device=dev)
            self.shared_gen.manual_seed(settings.seed)
        self.requests: dict[int, Request] = {}
        self._queue: deque[Request] = deque()
        self._next_rid = 0
        self._slots: list[Request | None] = [None] * engine.batch_size
        self.strategy = None
        self.steps = 0  # decoding steps run (after prefill), all rows together
        self.device_steps = 0  # the tally's count of steps in which some row was active
        self.syncs = 0
        self.maxpos = 0  # a bound on every row's cache position, as of the last check
        self.since = 0  # steps since that check
        self.t0 = time.perf_counter()
        self.compile_before = engine.runner.compile_time_s
        st.tally.reset()
        st.emitter.done.fill_(True)
        engine.generation = self

    # ---- rows joining and leaving ------------------------------------------------------------
    def add(self, prompt: Sequence[int], sampling: Sampling | None = None, seed: int | None = None,
            max_new_tokens: int | None = None) -> int:
        """Queue one prompt; it joins at the next `step` with a free slot.

        Args:
            prompt: token ids (non-empty, shorter than the context, inside the vocabulary).
            sampling: this row's settings (default: the generation's).
            seed: this row's own generator (default: the generation's shared one).
            max_new_tokens: this row's budget (default: the generation's), capped by the context.
        Returns:
            the request id (`requests[rid]`, keys of `new_tokens()`).
        """
        L, V = self.model.config.max_seq_len, self.model.config.vocab_size
        ids = list(prompt)
        if not ids:
            raise UserError("empty prompt: give at least one token of prompt text")
        if len(ids) >= L:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the context of {L}: shorten the prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise UserError(f"prompt token ids must be integers from 0 to {V - 1} (this model's vocabulary)")
        n = check_max_new_tokens(self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens)
        check_decode_options(V, None, seed, None)
        if sampling is not None and not isinstance(sampling, Sampling):
            raise BadValue("sampling", repr(sampling), "give a multitoken.decoding.Sampling(temperature, top_k, top_p), or None")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.engine.state.device)
            gen.manual_seed(seed)
        r = Request(self._next_rid, ids, sampling or self.settings.sampling, min(n, L - len(ids)), gen)
        self._next_rid += 1
        self.requests[r.rid] = r
        self._queue.append(r)
        return r.rid

    def cancel(self, rid: int) -> None:
        """Stop a row now (a client went away): its slot is free for the next `step`."""
        r = self.requests[rid]
        if r.done:
            return
        if r in self._queue:
            self._queue.remove(r)
        elif r.slot >= 0:
            self.engine.state.emitter.done[r.slot] = True
            self._free([r])
        r.done, r.finish_reason = True, "cancelled"

    def forget(self, rid: int) -> None:
        """Drop a finished request's record (a long-running server would otherwise keep them all)."""
        if not self.requests[rid].done:
            raise UserError(f"request {rid} is still decoding: cancel it before forgetting it")
        del self.requests[rid]

    @property
    def active(self) -> list[Request]:
        return [r for r in self._slots if r is not None]

    @property
    def done(self) -> bool:
        """No row decoding and none waiting."""
        return not self._queue and not self.active

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._queue)

    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    def _free(self, rows: list[Request]) -> None:
        for r in rows:
            self._slots[r.slot] = None
            self._stale.pop(r.slot, None)

    # ---- steps ------------------------------------------------------------------------------
    def step(self) -> None:
        """Prefill the rows waiting for a slot (if any can join), else decode until the next host check."""
        if self.engine.generation is not self:
            raise UserError("this engine has started another generation since: one generation per engine at a time")
        if self._queue and self.free_slots:
            with torch.no_grad():
                self._join()
        elif self.active:
            with torch.no_grad():
                self._decode()

    def _sampling_for(self, rows: list[Request]) -> RowSampling:
        st = self.engine.state
        return RowSampling(greedy=all(r.sampling.greedy for r in rows),
                           filtered=any(r.sampling.top_k > 0 or r.sampling.top_p < 1.0 for r in rows),
                           temperature=st.temperature, top_k=st.top_k, top_p=st.top_p)

    def _use_strategy(self, s: RowSampling) -> None:
        """Run `s`'s strategy from now on.

        Switching from greedy to sampling needs nothing for the rows already decoding: a greedy
        row's target is one-hot, so lossless verification accepts exactly the drafts equal to its
        argmax and emits the argmax whatever draft distribution q the buffer holds for it.
        """
        st = self.engine.state
        if not s.greedy and self.mode_now == "spec" and self.k_now > 0 and not self.typical:
            st.ensure_sampling_buffers(self.model.depth)
        tree = self.tree if self.mode_now == "tree" else None
        self.strategy = self.engine.strategy(self.mode_now, self.k_now, s, tree, self.typical, switching=self.auto)
        self.periodic = (self.strategy.k > 0 or self.settings.eos_id is not None or self.settings.stream)
        if self.auto and self.policy is None:
            # Trees compete with plain steps only, and for good; a chain may probe out of plain steps
            # where drafting resumes as good as it was (`_Drafting.resumable`).
            self.policy = DraftPolicy(self.k, resumable=self.settings.mode == "spec" and self.strategy.resumable)
            if self.settings.mode == "spec":
                self.engine.policies[(self.settings.sampling, self.typical)] = self.policy

    def _fill_rand(self, st: DecodeState, rows: list[tuple[int, Request]]) -> None:
        """This step's uniforms: the shared generator for all rows, then each own generator its row."""
        st.rand.uniform_(generator=self.shared_gen)
        for i, r in rows:
            if r.generator is not None:
                st.rand[i].uniform_(generator=r.generator)

    def _join(self) -> None:
        st, model = self.engine.state, self.model
        free = [i for i, r in enumerate(self._slots) if r is None]
        new = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
        in_place = not self.active  # nothing decoding: prefill over the whole batch, no copies
        if in_place and self.auto and self.steps and (self.mode_now, self.k_now) != (self.settings.mode, self.k):
            # Every row is prefilled here, so drafts and module caches start fresh: the draft-length
            # choice starts again from the plan. Without this a plain choice, which is never undone
            # mid-flight (`choose_draft`), would hold for the rest of a long generation (a server's).
            self.mode_now, self.k_now = self.settings.mode, self.k
            self.chosen.append(self.k)
            self._probe_at, self._chosen_at = None, self.steps
        if in_place:
            self._stale.clear()
        for r, slot in zip(new, free):
            r.slot, r.joined_at, r.k, r.count = slot, self.steps, self.k, 1
            self._slots[slot] = r
            if self.auto and self.k_now < self.k:
                # A short prefill runs every module over the prompt (`_Drafting.prefill`); a plain
                # one only records what they read.
                self._stale[slot] = 0 if self.k_now == 0 else max(0, len(r.prompt) - self.k)
        self._use_strategy(self._sampling_for(self.active))
        if in_place:
            self._prefill(self.engine, [(r.slot, r) for r in new], st.batch_size)
        else:
            i = 0
            while i < len(new):  # groups of powers of two, so that few side states are made
                size = 1 << (len(new) - i).bit_length() - 1
                group = new[i: i + size]
                side = self.engine.side(size)
                if st.qd is not None:
                    side.state.ensure_sampling_buffers(model.depth)
                if st.lq is not None:
                    side.state.ensure_tree_buffers(model.depth)
                width = self._prefill(side, list(enumerate(group)), size)
                dev = st.device
                st.copy_rows(side.state, torch.arange(size, device=dev),
                             torch.tensor([r.slot for r in group], device=dev), width)
                i += size
        self.maxpos = max([self.maxpos] + [len(r.prompt) for r in new])
        if self.settings.stream:
            self._check(all_done=False)

    def _prefill(self, engine: Engine, rows: list[tuple[int, Request]], size: int) -> int:
        """Prefill `rows` (index in `engine`'s state, request) of a state of `size` rows; other rows stay done.

        Returns:
            the padded prompt width (the cache slots the prefill wrote).
        """
        st, dev, L = engine.state, engine.state.device, self.model.config.max_seq_len
        longest = max(len(r.prompt) for _, r in rows)
        T = min(-(-longest // PREFILL_BUCKET) * PREFILL_BUCKET, L)
        idx = torch.zeros(size, T, dtype=torch.long)
        lengths = torch.ones(size, dtype=torch.long)
        budgets = torch.zeros(size, dtype=torch.long)
        temp, top_k, top_p = torch.zeros(size), torch.zeros(size, dtype=torch.long), torch.ones(size)
        for i, r in rows:
            idx[i, : len(r.prompt)] = torch.tensor(r.prompt)
            lengths[i], budgets[i] = len(r.prompt), r.budget
            temp[i], top_k[i], top_p[i] = r.sampling.temperature, r.sampling.top_k, r.sampling.top_p
        eos = torch.tensor([eos_row(self.settings.eos_id)], dtype=torch.long).expand(size, -1)
        every = torch.arange(size)
        idx, lengths, every = idx.to(dev), lengths.to(dev), every.to(dev)
        st.set_sampling(every, temp.to(dev), top_k.to(dev), top_p.to(dev))
        st.emitter.join(every, budgets.to(dev), eos.to(dev))
        st.tally.reset(every)
        s = self.strategy.s
        tree = self.tree if self.mode_now == "tree" else None
        strategy = engine.strategy(self.mode_now, self.k_now, RowSampling(s.greedy, s.filtered, st.temperature, st.top_k,
                                                                          st.top_p), tree, self.typical, switching=self.auto)
        if not s.greedy:
            self._fill_rand(st, rows)
        st.cache.live = bucket(T + 1, st.cache.max_seq_len)
        strategy.prefill(idx, lengths)
        return T

    def _sure_done_at(self) -> int:
        """The step after which every decoding row has surely spent its budget (>= 1 token a step)."""
        return max(r.joined_at + r.budget - 1 for r in self.active)

    def _decode(self) -> None:
        st, runner = self.engine.state, self.engine.runner
        rows = [(r.slot, r) for r in self.active]
        sure = self._sure_done_at()
        every = self.sync_every
        if self.paced and not self._queue:
            # A step emits at most k+1 tokens per row: this many steps cannot finish any row.
            every = max(every, min(8, min(r.budget - r.count for r in self.active) // (self.strategy.k + 1)))
        while self.steps < sure:
            if not self.strategy.s.greedy:
                self._fill_rand(st, rows)
            runner.step(self.strategy, self.maxpos + (self.since + 1) * (self.strategy.k + 1) + self.strategy.q)
            self.since += 1
            self.steps += 1
            if (self.periodic or self._queue) and self.since >= every:
                break
            if self._probe_at is not None and self.steps >= self._probe_at:
                break  # plain steps: a check for the draft-length probe
        self._check(all_done=self.steps >= sure)

    def _check(self, all_done: bool) -> None:
        """One read of the device: done flags, counts, statistics, and the new tokens when streaming."""
        st, rows = self.engine.state, self.active
        B, K1 = st.batch_size, st.tally.hist.shape[1]
        width = st.emitter.out.shape[1]
        read_out = self.settings.stream or all_done
        lo = min(len(r.tokens) for r in rows)
        stream = self.settings.stream  # tokens read at every check: only the new ones can be there
        hi = min(width, max(min(r.budget, len(r.tokens) + 1 + self.since * (self.strategy.k + 1)) if stream else r.budget
                            for r in rows))
        parts = [st.emitter.done.long(), st.emitter.count, st.cache.pos, st.tally.steps[None],
                 st.tally.row_steps, st.tally.step_tokens, st.tally.hist.flatten()]
        if read_out:
            parts.append(st.emitter.out[:, lo:hi].flatten())
        vals = torch.cat(parts).tolist()
        self.syncs += 1
        done, count, pos = vals[:B], vals[B: 2 * B], vals[2 * B: 3 * B]
        self.device_steps, self.since = vals[3 * B], 0
        o = 3 * B + 1
        H = K1 * K1
        row_steps, step_tokens, hist = vals[o: o + B], vals[o + B: o + 2 * B], vals[o + 2 * B: o + 2 * B + B * H]
        out = vals[o + 2 * B + B * H:]
        finished = []
        new_hist = [[0] * K1 for _ in range(K1)]  # the rows' steps since the last check, for the policy
        for r in rows:
            b = r.slot
            h = [hist[b * H + i * K1: b * H + (i + 1) * K1] for i in range(K1)]
            for i in range(K1):
                for n in range(K1):
                    new_hist[i][n] += h[i][n] - (r.hist[i][n] if r.hist else 0)
            r.row_steps, r.step_tokens, r.hist, r.count = row_steps[b], step_tokens[b], h, count[b]
            if read_out:
                w = hi - lo
                r.tokens += out[b * w + len(r.tokens) - lo: b * w + count[b] - lo]
            if done[b] or all_done:
                finished.append(r)
        if finished and not read_out:  # the finished rows' tokens, read once
            slots = torch.tensor([r.slot for r in finished], device=st.device)
            for r, toks in zip(finished, st.emitter.out[slots, : max(count[r.slot] for r in finished)].tolist()):
                r.tokens = toks[: count[r.slot]]
            self.syncs += 1
        for r in finished:
            stops = eos_ids(self.settings.eos_id)
            r.done, r.finish_reason = True, ("stop" if r.tokens and r.tokens[-1] in stops else "length")
        if finished:
            self._free(finished)
            if self.active:  # the rows left may all be greedy now: the cheaper step serves them
                self._use_strategy(self._sampling_for(self.active))
        # The live bucket follows the rows still decoding: a free row's stale position must not widen it.
        self.maxpos = max((pos[r.slot] for r in self.active), default=0)
        if self.policy is not None:
            self.policy.observe(new_hist, self.steps - self._observed)
            self._observed = self.steps
        # The choice runs about every 8 steps (each check on the CPU, where checks are every step),
        # and while plain at the check a probe is due at.
        if self.auto and self.active and (self.steps - self._chosen_at >= self.choose_every
                                           or self._probe_at is not None and self.steps >= self._probe_at):
            self._chosen_at = self.steps
            self._choose_draft(pos)

    def _choose_draft(self, pos: list[int]) -> None:
        """Switch to the strategy the measured step costs and the acceptance so far pick (see
        `draft_policy`); a tree competes with plain steps only, and for good (`best_draft`)."""
        engine, runner, cur, K, s = self.engine, self.engine.runner, self.strategy, self.k, self.strategy.s
        sw = dict(switching=True)
        if self.settings.mode == "tree":
            if cur.k == 0:
                return
            hist = [sum(r.hist[K][n] for r in self.active if r.hist) for n in range(K + 1)]
            if sum(hist) < 8:
                return
            options = {K: cur, 0: engine.strategy("ntp", 0, s, **sw)}
            costs = {0: runner.cost(options[0], self.maxpos + 9), K: runner.cost(cur, self.maxpos + cur.q + 8 * (K + 1))}
            if any(c is None for c in costs.values()):
                return
            new = options[best_draft([sum(n * c for n, c in enumerate(hist)) / sum(hist)] + [0.0] * (K - 1), costs)]
        else:
            options = {j: engine.strategy("spec", j, s, None, self.typical, **sw) for j in range(K + 1)}
            costs = {j: runner.cost(o, self.maxpos + o.q + 8 * (j + 1)) for j, o in options.items()}
            if any(c is None for c in costs.values()):
                return
            new = options[self.policy.choose(costs, cur.k)]
        steps = self.policy.steps_to_probe() if new.k == 0 else None
        self._probe_at = None if steps is None else self.steps + max(steps, 1)
        if new is cur:
            return
        rows = self.active
        if new.k < cur.k:  # the state of modules (or heads) past new.k is no longer kept from here
            for r in rows:
                self._stale[r.slot] = min(self._stale.get(r.slot, pos[r.slot]), max(0, pos[r.slot] - K))
        longer = new.k > cur.k
        self.mode_now, self.k_now = ("ntp", 0) if new.k == 0 else (self.settings.mode, new.k)
        self.chosen.append(new.k)
        self._use_strategy(s)
        if longer:
            st = self.engine.state
            # Rewrite every module's entries since the oldest position a row did not keep, then
            # draft afresh (fresh uniforms: a draft must not share them with an emitted token).
            need = max(pos[r.slot] - self._stale.get(r.slot, pos[r.slot] - 2 * K) for r in rows)
            width = 1 << (max(need, 2 * K) - 1).bit_length()  # a power of two: few shapes to compile
            if not s.greedy:
                self._fill_rand(st, [(r.slot, r) for r in rows])
            st.cache.live = bucket(self.maxpos + 1, st.cache.max_seq_len)
            self.strategy.resume(width, cur.k)
            self._stale = {} if new.k >= K else {r.slot: max(0, pos[r.slot] - K) for r in rows}

    # ---- results ----------------------------------------------------------------------------
    def new_tokens(self) -> dict[int, list[int]]:
        """Tokens each request produced since the last call, by request id (only requests with some)."""
        out = {}
        for r in self.requests.values():
            if len(r.tokens) > r.unread:
                out[r.rid] = r.tokens[r.unread:]
                r.unread = len(r.tokens)
        return out

    def result(self) -> tuple[list[list[int]], GenerationStats]:
        """(token lists in the order the requests were added, statistics); decodes to the end first."""
        while not self.done:
            self.step()
        reqs = list(self.requests.values())
        wall = time.perf_counter() - self.t0
        K = self.k
        row_steps = sum(r.row_steps for r in reqs)
        stats = GenerationStats(mode=self.settings.mode, draft=self.k, batch_size=len(reqs),
                                lossless=not (self.typical and not all(r.sampling.greedy for r in reqs)))
        stats.new_tokens = sum(len(r.tokens) for r in reqs)
        stats.steps, stats.row_steps = self.device_steps, row_steps
        stats.step_tokens = sum(r.step_tokens for r in reqs)
        stats.tau = stats.step_tokens / row_steps if row_steps else 0.0
        hist = [[sum(r.hist[i][n] for r in reqs if r.hist) for n in range(K + 1)] for i in range(K + 1)]
        drafted, _, accepted = hist_counts(hist, K)
        stats.drafted, stats.accepted = [int(d) for d in drafted], [int(a) for a in accepted]
        stats.acceptance_per_position = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
        stats.chosen_draft, stats.host_syncs = self.chosen, self.syncs
        stats.compile_time_s = self.engine.runner.compile_time_s - self.compile_before
        stats.wall_time_s = wall
        stats.tokens_per_second = stats.new_tokens / wall if wall > 0 else 0.0
        return [r.tokens for r in reqs], stats

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



@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int = 64, mode: str = "ntp", draft: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             tree=None, eos_id: int | Sequence[int] | None = None, lossy_typical: bool = False, compile: bool | None = None,
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
        eos_id: stop a row after this token, or after any of a list of ids (None: only the token limit stops).
        lossy_typical: Medusa's typical acceptance instead of exact verification (LOSSY).
        compile: torch.compile the model's blocks for decoding (default: on CUDA; cached on disk).
        graphs: capture steps as CUDA graphs (default: on CUDA).
        sync_every: steps between checks of "all rows done?" (default 8 on CUDA, 1 on the CPU).
    Returns:
        (token lists per row, without the prompt; GenerationStats).
    """
    settings = Settings(max_new_tokens, mode, draft, tree, eos_id, lossy_typical, sync_every,
                        sampling=Sampling(temperature, top_k, top_p), seed=seed)
    check_decode_options(model.config.vocab_size, draft, seed, eos_id)
    idx, _ = prepare_prompts(prompt_ids, model.config.max_seq_len, vocab_size=model.config.vocab_size)
    _, q, _ = plan(model, settings)
    engine = engine_for(model, idx.shape[0], q + 1, compile, graphs)
    with engine.lock:
        return engine.start(prompt_ids, settings).result()


class TextStream:
    """Iterate text pieces as tokens are accepted (batch 1); `stats`, `token_ids`, `text` after.

    Stops on EOS, on any of `stop` strings (the text is cut before it) or at the token limit.
    Text that could be the start of a stop string is held back until it is clearly not.
    Keyword arguments are `generate`'s.
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
        kw = dict(self.kwargs)
        compile, graphs = kw.pop("compile", None), kw.pop("graphs", None)
        sampling = Sampling(kw.pop("temperature", 0.0), kw.pop("top_k", 0), kw.pop("top_p", 1.0))
        settings = Settings(**kw, sampling=sampling, stream=True)
        _, q, _ = plan(self.model, settings)
        gen = engine_for(self.model, 1, q + 1, compile, graphs).start([self.ids], settings)
        texts = StopText(self.tokenizer, self.stop, self.kwargs.get("eos_id"))
        while not gen.done and not texts.stopped:
            gen.step()
            new = gen.new_tokens().get(0, [])
            self.token_ids += new
            piece = texts.push(new)
            if piece:
                yield piece
        if texts.stopped:
            gen.cancel(0)
        piece = texts.finish()
        if piece:
            yield piece
        self.text = texts.text
        _, self.stats = gen.result()
        self.stats.new_tokens = len(self.token_ids)
        wall = self.stats.wall_time_s
        self.stats.tokens_per_second = self.stats.new_tokens / wall if wall > 0 else 0.0

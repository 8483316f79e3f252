"""`multitoken distill-data`: training data for drafting heads, written by the target model itself.

A drafter learns the model it serves best from text that model writes (EAGLE-3, DFlash and vLLM's
speculators regenerate every training answer with the target). Offline there is no chat data set,
so chat follows Magpie (arXiv 2406.08464): an instruct model given only its chat template up to the
user turn (``<|im_start|>user\\n`` after the system prompt) writes a plausible user message, which it
then answers. Code is the model's own continuation of prefixes cut from a prepared corpus, beside
whole corpus documents (``corpus_tokens``), so the heads keep seeing real code too.

The output is a DATA_DIR that `train` reads like one of `prepare`, plus a loss mask per split
(``train.mask.bin``, ``val.mask.bin``: 1 on the tokens the model wrote, 0 on the template, the
user turns and the code prefixes). Each conversation or code piece is one document ending in EOS.
``meta.json`` records the counts, the diversity of what was written (distinct n-grams, length
percentiles), the generation throughput and the settings; ``samples.jsonl`` holds a few examples
as text to read.

Everything is generated with multitoken's own batched engine (`decoding.generate`, plain decoding,
one batch size throughout so compiled steps and CUDA graphs are built once); user messages that
do not end their turn, that repeat themselves or that repeat an earlier message are dropped, and
so is any that equals an evaluation prompt (``exclude``), so benchmarks stay on unseen prompts.
"""

from __future__ import annotations

import logging
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitoken.data.prepare import FORMAT, META_FILE, load_meta, shard_path
from multitoken.data.shards import ShardWriter, dtype_for_vocab, read_shard
from multitoken.errors import BadValue, UserError
from multitoken.io import outdir

log = logging.getLogger(__name__)

SENTINEL = "\x00MULTITOKEN-USER-TURN\x00"
MASK_VOCAB = 2  # a mask shard holds 0/1 "the model wrote this token"
DATA_FILES = (META_FILE, "train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "tokenizer.json",
              "tokenizer_config.json", "samples.jsonl", outdir.MARKER_FILE)


@dataclass
class SelfGenConfig:
    """What `distill-data` writes and how."""

    chat: int = 2048
    """Conversations to write (fewer if `max_minutes` runs out first)."""
    code: int = 2048
    """Code continuations to write (needs `corpus`)."""
    batch_size: int = 64
    """Rows per generation batch; every batch is padded to it, so the engine is built once."""
    user_tokens: int = 128
    """Most tokens of a generated user message; one that has not ended its turn by then is dropped."""
    answer_tokens: int = 384
    """Most tokens of an answer (a longer one is kept, cut there)."""
    code_prefix: tuple[int, int] = (32, 256)
    """Shortest and longest code prefix, in tokens."""
    code_tokens: int = 256
    """Most tokens of a code continuation."""
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    """Answers and continuations cycle through these (0 = greedy), a batch at a time."""
    user_temperature: float = 1.0
    """Temperature of the user messages (Magpie: 1 with top-p 0.95)."""
    top_p: float = 0.95
    """Nucleus of every sampled batch."""
    multi_turn: float = 0.25
    """Share of conversations that get a second user turn and answer."""
    corpus_tokens: int = 0
    """Tokens of whole corpus documents copied beside the generated ones (mask 1: real text to learn too)."""
    val_every: int = 40
    """Every this-many-th document goes to the validation split."""
    max_minutes: float | None = None
    """Stop generating after this long (the counts above are then upper bounds)."""
    seed: int = 0
    """Seeds the prefixes, the documents copied and every sampled batch."""
    continuous: bool = False
    """Continuous batching (`ContinuousWriter`): a request joins the batch as soon as another
    leaves, instead of every batch running until its longest row ends. Conversations and code
    pieces are then each written at their own temperature, and `chat`/`code` count jobs started."""

    def __post_init__(self) -> None:
        for name in ("chat", "code", "corpus_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise BadValue(name, getattr(self, name), "give a count of 0 or more")
        for name in ("batch_size", "user_tokens", "answer_tokens", "code_tokens", "val_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise BadValue(name, getattr(self, name), "give a positive integer")
        lo, hi = self.code_prefix
        if not 1 <= lo <= hi:
            raise BadValue("code_prefix", self.code_prefix, "give MIN,MAX with 1 <= MIN <= MAX")
        if not self.temperatures or any(not (0 <= t <= 10) for t in self.temperatures):
            raise BadValue("temperatures", self.temperatures, "give temperatures between 0 and 10")
        if not 0 < self.top_p <= 1:
            raise BadValue("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.multi_turn <= 1:
            raise BadValue("multi_turn", self.multi_turn, "must be between 0 and 1")


# ---- what the model writes --------------------------------------------------------------------


def user_turn_prefix(tok, history: Sequence[dict[str, str]] = ()) -> list[int]:
    """The ids of the chat template rendered up to where the next user message starts (Magpie's
    "pre-query template"): the system prompt the template adds, `history`, then the user header."""
    text = tok.render_chat([*history, {"role": "user", "content": SENTINEL}], add_generation_prompt=False)
    cut = text.find(SENTINEL)
    if cut < 0:
        raise UserError("the chat template does not show the user's message: Magpie data needs a template that does")
    return tok.encode(text[:cut], special=True)


def good_user_message(text: str) -> bool:
    """A plausible user message: some words, no template markup, not one phrase repeated."""
    words = text.split()
    if len(text) < 8 or len(words) < 2 or "<|" in text or SENTINEL in text:
        return False
    if len(words) >= 12 and len(set(words)) / len(words) < 0.4:  # rambling: the same few words again and again
        return False
    return True


def normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams (Li et al. 2016): 1.0 = no n-gram repeats anywhere."""
    grams = Counter(tuple(s[i: i + n]) for s in seqs for i in range(len(s) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"n": int(a.size), "mean": round(float(a.mean()), 1),
            **{f"p{q}": float(np.percentile(a, q)) for q in (10, 50, 90, 99)}, "max": int(a.max())}


class BatchedWriter:
    """Runs `generate` on lists of prompts in batches of exactly `batch_size` (padding the last one
    with copies, whose outputs are dropped), so one engine serves every call."""

    def __init__(self, model, batch_size: int, eos_id: int, top_p: float, seed: int,
                 generate: Callable | None = None) -> None:
        from multitoken.decoding import generate as default

        self.model, self.B, self.eos_id, self.top_p, self.seed = model, batch_size, eos_id, top_p, seed
        self.generate = generate or default
        self.calls = 0
        self.new_tokens = 0  # tokens kept (the padding rows' are not counted)
        self.seconds = 0.0

    def __call__(self, prompts: list[list[int]], max_new: int, temperature: float) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(prompts), self.B):
            group = prompts[i: i + self.B]
            padded = group + [group[-1]] * (self.B - len(group))
            t = time.perf_counter()
            rows, _ = self.generate(self.model, padded, max_new, mode="ntp", temperature=temperature,
                                    top_p=self.top_p if temperature > 0 else 1.0, seed=self.seed + self.calls,
                                    eos_id=self.eos_id)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            rows = rows[: len(group)]
            self.new_tokens += sum(len(r) for r in rows)
            out += rows
        return out


@dataclass
class Document:
    ids: list[int]
    mask: list[int]
    kind: str
    text: dict[str, Any] = field(default_factory=dict)


def write_chat(tok, run: BatchedWriter, cfg: SelfGenConfig, n: int, temperature: float, exclude: set[str],
               seen: set[str], stats: Counter, context: int) -> list[Document]:
    """About `n` Magpie conversations (one batch of user messages per round, then their answers)."""
    docs: list[Document] = []
    rounds = 0
    while len(docs) < n and rounds < 8:
        rounds += 1
        prefix = user_turn_prefix(tok)
        users = run([prefix] * cfg.batch_size, cfg.user_tokens, cfg.user_temperature)
        convs = []
        for ids in users:
            text = user_message(tok, ids, exclude, seen, stats)
            if text is not None:
                convs.append([{"role": "user", "content": text}])
        convs = convs[: n - len(docs)]
        if not convs:
            continue
        docs += answer(tok, run, cfg, convs, temperature, stats, context)
        # Second turns: the model writes a follow-up question after its own answer, then answers it.
        k = int(round(cfg.multi_turn * len(convs)))
        follow = [d.text["messages"] for d in docs[-len(convs):][:k] if d.text.get("finished")]
        if follow:
            prompts = [user_turn_prefix(tok, m) for m in follow]
            keep = [(m, p) for m, p in zip(follow, prompts) if len(p) + cfg.user_tokens + cfg.answer_tokens < context]
            users = run([p for _, p in keep], cfg.user_tokens, cfg.user_temperature) if keep else []
            second = []
            for (m, _), ids in zip(keep, users):
                if ids and ids[-1] == tok.eos_id:
                    text = tok.decode(ids[:-1], skip_special_tokens=True).strip()
                    if good_user_message(text) and normalise(text) not in exclude:
                        second.append([*m, {"role": "user", "content": text}])
            stats["second_turns"] += len(second)
            docs += answer(tok, run, cfg, second, temperature, stats, context)
    return docs


def answer(tok, run: BatchedWriter, cfg: SelfGenConfig, convs: list[list[dict[str, str]]], temperature: float,
           stats: Counter, context: int) -> list[Document]:
    """The model's answers to `convs`, one document each: the rendered prompt (mask 0) then the answer (mask 1)."""
    prompts = [tok.chat(m) for m in convs]
    keep = [(m, p) for m, p in zip(convs, prompts) if len(p) + cfg.answer_tokens < context]
    outs = run([p for _, p in keep], cfg.answer_tokens, temperature)
    return [chat_document(tok, m, p, ids, temperature, stats) for (m, p), ids in zip(keep, outs)]


def user_message(tok, ids: list[int], exclude: set[str], seen: set[str], stats: Counter) -> str | None:
    """The text of a generated user message, or None (counted in `stats`) when it is dropped:
    unfinished, rambling, an evaluation prompt, or a repeat of one already kept (then added to `seen`)."""
    stats["user_written"] += 1
    if not ids or ids[-1] != tok.eos_id:
        stats["user_unfinished"] += 1
        return None
    text = tok.decode(ids[:-1], skip_special_tokens=True).strip()
    key = normalise(text)
    if not good_user_message(text):
        stats["user_rejected"] += 1
    elif key in exclude:
        stats["user_eval_prompt"] += 1
    elif key in seen:
        stats["user_duplicate"] += 1
    else:
        seen.add(key)
        return text
    return None


def chat_document(tok, messages: list[dict[str, str]], prompt: list[int], ids: list[int], temperature: float,
                  stats: Counter) -> Document:
    """One conversation: the rendered prompt (mask 0), then the answer the model wrote (mask 1)."""
    finished = bool(ids) and ids[-1] == tok.eos_id
    stats["answers_finished" if finished else "answers_cut"] += 1
    tail = [] if finished else [tok.eos_id]  # a document always ends in EOS; the model did not write this one
    said = [*messages, {"role": "assistant", "content": tok.decode([i for i in ids if i != tok.eos_id], skip_special_tokens=True)}]
    return Document(prompt + ids + tail, [0] * len(prompt) + [1] * len(ids) + [0] * len(tail), "chat",
                    {"messages": said, "temperature": temperature, "finished": finished,
                     "answer_tokens": len(ids), "user_tokens": len(tok.encode(messages[-1]["content"]))})


def code_windows(corpus: np.ndarray, eos_id: int, n: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    """n code prefixes of lo..hi tokens, each from a random document of `corpus`, starting at the
    document's start half of the time and at a random line-free offset otherwise."""
    ends = np.flatnonzero(corpus == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    long = np.flatnonzero(ends - starts >= lo + 16)
    if long.size == 0:
        raise UserError(f"the corpus has no document of more than {lo + 16} tokens to cut code prefixes from")
    out = []
    for _ in range(n):
        d = int(long[rng.randrange(long.size)])
        a, b = int(starts[d]), int(ends[d])
        L = rng.randint(lo, min(hi, b - a - 16))
        s = a if rng.random() < 0.5 else rng.randint(a, b - 16 - L)
        out.append(corpus[s: s + L].astype(np.int64).tolist())
    return out


def write_code(run: BatchedWriter, cfg: SelfGenConfig, corpus: np.ndarray, eos_id: int, n: int, temperature: float,
               rng: random.Random, stats: Counter) -> list[Document]:
    prefixes = code_windows(corpus, eos_id, n, *cfg.code_prefix, rng)
    outs = run(prefixes, cfg.code_tokens, temperature)
    return [code_document(p, ids, eos_id, temperature, stats) for p, ids in zip(prefixes, outs)]


def code_document(prefix: list[int], ids: list[int], eos_id: int, temperature: float, stats: Counter) -> Document:
    """One code piece: the corpus prefix (mask 0), then the model's continuation (mask 1), ending in EOS."""
    tail = [] if ids and ids[-1] == eos_id else [eos_id]
    stats["code_written"] += 1
    return Document(prefix + ids + tail, [0] * len(prefix) + [1] * len(ids) + [0] * len(tail), "code",
                    {"prefix_tokens": len(prefix), "tokens": len(ids), "temperature": temperature})


# ---- continuous batching: each conversation or code piece is a job of one or more requests ----

Ask = tuple[list[int], int, float]
"""A request a job makes: (prompt ids, most new tokens, temperature); the writer sends back what was written."""
Job = Generator[Ask, list[int], list[Document]]


def chat_job(tok, cfg: SelfGenConfig, temperature: float, exclude: set[str], seen: set[str], stats: Counter,
             context: int, rng: random.Random) -> Job:
    """One Magpie conversation as a job: a user message, its answer, and for a share `multi_turn` of
    the answers that ended, a second user message and its answer (the same filters as `write_chat`)."""
    text = user_message(tok, (yield user_turn_prefix(tok), cfg.user_tokens, cfg.user_temperature), exclude, seen, stats)
    if text is None:
        return []
    messages = [{"role": "user", "content": text}]
    prompt = tok.chat(messages)
    if len(prompt) + cfg.answer_tokens >= context:
        return []
    docs = [chat_document(tok, messages, prompt, (yield prompt, cfg.answer_tokens, temperature), temperature, stats)]
    history = docs[0].text["messages"]
    if not docs[0].text["finished"] or rng.random() >= cfg.multi_turn:
        return docs
    prefix = user_turn_prefix(tok, history)
    if len(prefix) + cfg.user_tokens + cfg.answer_tokens >= context:
        return docs
    ids = yield prefix, cfg.user_tokens, cfg.user_temperature
    if not ids or ids[-1] != tok.eos_id:
        return docs
    text = tok.decode(ids[:-1], skip_special_tokens=True).strip()
    if not good_user_message(text) or normalise(text) in exclude:
        return docs
    messages = [*history, {"role": "user", "content": text}]
    prompt = tok.chat(messages)
    if len(prompt) + cfg.answer_tokens >= context:
        return docs
    stats["second_turns"] += 1
    docs.append(chat_document(tok, messages, prompt, (yield prompt, cfg.answer_tokens, temperature), temperature, stats))
    return docs


def code_job(prefix: list[int], cfg: SelfGenConfig, temperature: float, eos_id: int, stats: Counter) -> Job:
    """One code continuation as a job."""
    return [code_document(prefix, (yield prefix, cfg.code_tokens, temperature), eos_id, temperature, stats)]


class ContinuousWriter:
    """Keeps every slot of one engine busy: requests join as others leave (continuous batching,
    `decoding.Generation`), each with its own temperature, seed and token budget.

    Args:
        model: the target model; batch_size: slots (rows decoding at once).
        eos_id: ends a request; top_p: nucleus of sampled requests; seed: request i is seeded seed + i.
        max_new: the most tokens any request asks for.
    """

    def __init__(self, model, batch_size: int, eos_id: int, top_p: float, seed: int, max_new: int) -> None:
        from multitoken.decoding.api import Settings, engine_for

        self.engine = engine_for(model, batch_size, 2)  # plain steps feed one token: scratch q + 1 = 2
        self.settings = Settings(max_new_tokens=max_new, mode="ntp", eos_id=eos_id)
        self.B, self.top_p, self.seed = batch_size, top_p, seed
        self.calls = 0  # host checks (each some decoding steps) and prefills
        self.requests = 0
        self.new_tokens = 0
        self.seconds = 0.0

    def run(self, jobs: Iterator[Job], deadline: float | None = None,
            progress: Callable[[int, float], None] | None = None) -> list[Document]:
        """Run `jobs` (started in order while fewer than 5/4 of the slots' requests wait or decode,
        and none after `deadline`, a `time.perf_counter()` value; jobs in flight then finish).
        Returns the documents of every job, in the order the jobs ended."""
        from multitoken.decoding.sampling import Sampling

        docs: list[Document] = []
        waiting: dict[int, Job] = {}
        t0 = time.perf_counter()
        last = t0
        with self.engine.lock:
            gen = self.engine.start([], self.settings)

            def ask(job: Job, written: list[int] | None) -> None:
                try:
                    prompt, n, T = job.send(written)  # type: ignore[arg-type]
                except StopIteration as stop:
                    docs.extend(stop.value)
                    return
                sampling = Sampling(T, 0, self.top_p if T > 0 else 1.0)
                rid = gen.add(prompt, sampling, seed=self.seed + self.requests, max_new_tokens=n)
                self.requests += 1
                waiting[rid] = job

            more = True
            while True:
                while more and len(waiting) < self.B + self.B // 4 and (deadline is None or time.perf_counter() < deadline):
                    job = next(jobs, None)
                    if job is None:
                        more = False
                    else:
                        ask(job, None)
                if not waiting:
                    break
                gen.step()
                self.calls += 1
                for rid in [rid for rid in waiting if gen.requests[rid].done]:
                    tokens = gen.requests[rid].tokens
                    gen.forget(rid)
                    self.new_tokens += len(tokens)
                    ask(waiting.pop(rid), tokens)
                if progress is not None and time.perf_counter() - last > 30:
                    last = time.perf_counter()
                    progress(len(docs), last - t0)
        self.seconds += time.perf_counter() - t0
        return docs


def write_continuous(tok, cfg: SelfGenConfig, model, corpus: np.ndarray | None, exclude: set[str], seen: set[str],
                     stats: Counter, context: int, rng: random.Random, deadline: float | None,
                     say: Callable[[str], None]) -> tuple[list[Document], ContinuousWriter]:
    """`cfg.chat` conversation jobs and `cfg.code` code jobs, interleaved, on one `ContinuousWriter`;
    temperatures cycle job by job."""
    writer = ContinuousWriter(model, cfg.batch_size, tok.eos_id, cfg.top_p, cfg.seed,
                              max(cfg.user_tokens, cfg.answer_tokens, cfg.code_tokens))
    code_rng = random.Random(rng.random())

    def jobs() -> Iterator[Job]:
        chat = code = i = 0
        while chat < cfg.chat or (code < cfg.code and corpus is not None):
            T = cfg.temperatures[i % len(cfg.temperatures)]
            if chat < cfg.chat and (corpus is None or code >= cfg.code or i % 2 == 0):
                chat += 1
                yield chat_job(tok, cfg, T, exclude, seen, stats, context, rng)
            else:
                code += 1
                prefix = code_windows(corpus, tok.eos_id, 1, *cfg.code_prefix, code_rng)[0]
                yield code_job(prefix, cfg, T, tok.eos_id, stats)
            i += 1

    def progress(n: int, seconds: float) -> None:
        say(f"distill-data: {n} documents, {writer.new_tokens:,} tokens written at "
            f"{writer.new_tokens / max(writer.seconds + seconds, 1e-9):,.0f} tok/s, {seconds:.0f} s")

    return writer.run(jobs(), deadline, progress), writer


def copy_corpus(corpus: np.ndarray, eos_id: int, tokens: int, rng: random.Random) -> list[Document]:
    """Whole corpus documents, chosen at random without repeats, until about `tokens` tokens."""
    ends = np.flatnonzero(corpus == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    order = list(range(ends.size))
    rng.shuffle(order)
    docs, total = [], 0
    for d in order:
        if total >= tokens:
            break
        ids = corpus[starts[d]: ends[d] + 1].astype(np.int64).tolist()
        docs.append(Document(ids, [1] * len(ids), "corpus"))
        total += len(ids)
    return docs


# ---- the job ----------------------------------------------------------------------------------


def distill_data(model, tok, out: str | Path, cfg: SelfGenConfig, corpus: str | Path | None = None,
                 exclude: Sequence[str] = (), progress: bool = True, generate: Callable | None = None,
                 keep: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write a DATA_DIR of text the model wrote itself (see the module docstring).

    Args:
        model: the target model (plain decoding is used; heads, if any, are ignored).
        tok: its tokenizer, with a chat template when cfg.chat > 0.
        out: the DATA_DIR to write (new, empty, or one of ours).
        cfg: what to write.
        corpus: a DATA_DIR of `prepare` made with the same tokenizer: code prefixes and copied documents.
        exclude: evaluation prompts (user message texts) never to keep as training conversations.
        progress: print a line per round on stderr.
        generate: the generation function (default `multitoken.decoding.generate`).
        keep: DATA_DIRs that earlier runs of this job wrote with the same tokenizer: each split's tokens
            and masks are carried over after the new documents (train to train, val to val), so data
            written on several machines or leases adds up; their counts are recorded in ``meta.json``.
    Returns:
        The contents of ``meta.json``.
    """
    out = Path(out)
    outdir.check(out, "prepare")
    if not (cfg.chat or cfg.code or cfg.corpus_tokens or keep):
        raise UserError("nothing to write: ask for --chat, --code or --corpus-tokens, or --keep earlier DATA_DIRs")
    kept = [kept_data(k, tok, out) for k in keep]  # refused before anything is generated
    if cfg.chat and not tok.chat_template:
        raise UserError("--chat needs a model whose tokenizer has a chat template (convert it from a GGUF or a folder that has one)")
    corpus_tokens = None
    if cfg.code or cfg.corpus_tokens:
        if corpus is None:
            raise UserError("code continuations and copied documents need --corpus DATA_DIR (a `multitoken prepare` of code)")
        meta = load_meta(corpus)
        if meta.get("tokenizer_sha256") != tok.fingerprint():
            raise UserError(f"--corpus {corpus} was prepared with another tokenizer than the model's: prepare it with --tokenizer RUN_DIR")
        corpus_tokens = read_shard(shard_path(corpus, "train"), tok.vocab_size)
    context = model.config.max_seq_len
    # Only what is written is checked: a code-only job on a short-context model is not held to chat's lengths.
    if (cfg.chat and cfg.answer_tokens + 64 > context) or (cfg.code and cfg.code_prefix[1] + cfg.code_tokens > context):
        raise UserError(f"the model's context ({context}) is too short for --answer-tokens/--code-tokens: ask for fewer")

    outdir.claim(out, "prepare")
    outdir.remove_temporaries(out, DATA_FILES)
    (out / META_FILE).unlink(missing_ok=True)
    say = log.info if progress else (lambda msg: None)
    rng = random.Random(cfg.seed)
    run = BatchedWriter(model, cfg.batch_size, tok.eos_id, cfg.top_p, cfg.seed, generate)
    stats: Counter = Counter()
    excluded = {normalise(t) for t in exclude}
    seen: set[str] = set()
    t0 = time.perf_counter()
    docs: list[Document] = []
    n_chat = n_code = rounds = 0
    deadline = None if cfg.max_minutes is None else t0 + 60 * cfg.max_minutes
    if cfg.continuous and (cfg.chat or cfg.code):
        docs, run = write_continuous(tok, cfg, model, corpus_tokens, excluded, seen, stats, context, rng, deadline, say)
    while not cfg.continuous and (n_chat < cfg.chat or n_code < cfg.code):
        if deadline is not None and time.perf_counter() > deadline:
            say("distill-data: time is up")
            break
        T = cfg.temperatures[rounds % len(cfg.temperatures)]
        rounds += 1
        if n_chat < cfg.chat:
            new = write_chat(tok, run, cfg, min(cfg.batch_size, cfg.chat - n_chat), T, excluded, seen, stats, context)
            n_chat += len(new)
            docs += new
        if n_code < cfg.code and corpus_tokens is not None:
            new = write_code(run, cfg, corpus_tokens, tok.eos_id, min(cfg.batch_size, cfg.code - n_code), T, rng, stats)
            n_code += len(new)
            docs += new
        rate = run.new_tokens / run.seconds if run.seconds else 0.0
        say(f"distill-data: round {rounds}, T={T:g}: {n_chat}/{cfg.chat} conversations, {n_code}/{cfg.code} code, "
            f"{run.new_tokens:,} tokens written at {rate:,.0f} tok/s, {time.perf_counter() - t0:.0f} s")
    if not docs and not cfg.corpus_tokens and not kept:
        raise UserError("the model wrote nothing usable (every user message was dropped): check the chat template")
    gen_seconds = time.perf_counter() - t0
    copied = copy_corpus(corpus_tokens, tok.eos_id, cfg.corpus_tokens, rng) if cfg.corpus_tokens else []
    meta = _write(out, tok, cfg, docs, copied, stats, run, gen_seconds, corpus, kept)
    say(f"distill-data: wrote {out}: {meta['splits']['train']['tokens']:,} train tokens "
        f"({meta['splits']['train']['written']:,} written by the model), {meta['splits']['val']['tokens']:,} val")
    return meta


def kept_data(path: str | Path, tok, out: Path) -> dict[str, Any]:
    """An earlier DATA_DIR of this job to carry into `out`: its meta.json, checked (same tokenizer, masks)."""
    path = Path(path)
    if path.resolve() == out.resolve():
        raise UserError(f"--keep {path} is the --out folder itself: write the merged data to a new folder")
    meta = load_meta(path)
    if meta.get("corpus_kind") != "self-generated" or any("mask" not in meta["splits"].get(s, {}) for s in ("train", "val")):
        raise UserError(f"--keep {path} was not written by `multitoken distill-data` (it has no loss masks): "
                        "keep only distill-data folders, or mix corpus text in with --corpus-tokens")
    if meta.get("tokenizer_sha256") != tok.fingerprint():
        raise UserError(f"--keep {path} was written with another tokenizer than the model's: keep data of this model only")
    return {"path": path, "meta": meta}


def _write(out: Path, tok, cfg: SelfGenConfig, docs: list[Document], copied: list[Document], stats: Counter,
           run: BatchedWriter | ContinuousWriter, gen_seconds: float, corpus, kept: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    for i, d in enumerate(docs):
        splits["val" if i % cfg.val_every == cfg.val_every - 1 else "train"].append(d)
    for i, d in enumerate(copied):
        splits["val" if i % cfg.val_every == cfg.val_every - 1 else "train"].append(d)
    if not splits["val"] and len(splits["train"]) >= 2:  # few documents: the last one still validates
        splits["val"].append(splits["train"].pop())
    for name in splits:
        if not splits[name] and not any(k["meta"]["splits"][name]["tokens"] for k in kept):
            raise UserError(f"only {len(docs) + len(copied)} document(s): too few for a train and a validation split; ask for more")
    counts = {}
    for name, items in splits.items():
        written = int(sum(sum(d.mask) for d in items if d.kind != "corpus"))
        kinds = Counter(d.kind for d in items)
        with ShardWriter(out / f"{name}.bin", tok.vocab_size) as w, ShardWriter(out / f"{name}.mask.bin", MASK_VOCAB) as m:
            for d in items:
                w.write(np.asarray(d.ids, dtype=np.int64))
                m.write(np.asarray(d.mask, dtype=np.int64))
            for k in kept:  # an earlier run's split, after the new documents: its documents end with EOS already
                split = k["meta"]["splits"][name]
                ids = read_shard(k["path"] / split["file"], tok.vocab_size)
                mask = read_shard(k["path"] / split["mask"], MASK_VOCAB)
                if len(ids) != len(mask):
                    raise UserError(f"--keep {k['path']}: its {name} tokens and mask differ in length; write that folder again")
                w.write(ids)
                m.write(mask)
                written += int(split["written"])
                kinds.update(split.get("kinds", {}))
        counts[name] = {"docs": len(items) + sum(k["meta"]["splits"][name]["docs"] for k in kept), "tokens": w.count,
                        "file": f"{name}.bin", "mask": f"{name}.mask.bin", "written": written, "kinds": dict(kinds)}
    tok.save(out)
    chat = [d for d in docs if d.kind == "chat"]
    answers = [[t for t, k in zip(d.ids, d.mask) if k] for d in chat]
    users = [tok.encode(d.text["messages"][-2]["content"]) for d in chat]
    code = [[t for t, k in zip(d.ids, d.mask) if k] for d in docs if d.kind == "code"]
    diversity = {
        "user_messages": {"distinct_1": distinct_n(users, 1), "distinct_2": distinct_n(users, 2), "distinct_3": distinct_n(users, 3),
                          "tokens": percentiles([len(u) for u in users])},
        "answers": {"distinct_1": distinct_n(answers, 1), "distinct_2": distinct_n(answers, 2), "distinct_3": distinct_n(answers, 3),
                    "tokens": percentiles([len(a) for a in answers]),
                    "by_temperature": dict(Counter(str(d.text["temperature"]) for d in chat))},
        "code": {"distinct_2": distinct_n(code, 2), "tokens": percentiles([len(c) for c in code])},
    }
    meta = {
        "format": FORMAT, "corpus": f"self-generated ({len(chat)} conversations, {len(code)} code continuations)",
        "corpus_kind": "self-generated", "tokenizer": "the model's", "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.fingerprint(), "eos_id": tok.eos_id,
        "eos_token": tok.eos_token, "bos_id": tok.bos_id, "dtype": dtype_for_vocab(tok.vocab_size).name,
        "splits": counts, "sources": {"val": []}, "skipped": [],
        "self_generated": {"filters": dict(stats), "diversity": diversity, "generation_seconds": round(gen_seconds, 1),
                           "generation_calls": run.calls, "batch_size": cfg.batch_size,
                           "tokens_written": run.new_tokens,
                           "tokens_per_s": round(run.new_tokens / run.seconds, 1) if run.seconds else None,
                           "config": asdict(cfg), "corpus": str(corpus) if corpus else None,
                           "kept": [{"path": str(k["path"]), "commit": k["meta"].get("commit"),
                                     "splits": {n: {x: v[x] for x in ("docs", "tokens", "written")} for n, v in k["meta"]["splits"].items()},
                                     "tokens_written": k["meta"].get("self_generated", {}).get("tokens_written")} for k in kept]},
        "seconds": {"generate": round(gen_seconds, 1)},
        "args": {"format": FORMAT, "kind": "self-generated", "config": asdict(cfg), "corpus": str(corpus) if corpus else None},
    }
    lines = [json.dumps({"kind": d.kind, **(d.text if d.kind == "chat" else {**d.text, "text": tok.decode(d.ids)})},
                        ensure_ascii=False) for d in chat[:100] + [d for d in docs if d.kind == "code"][:20]]
    outdir.write_text(out / "samples.jsonl", "".join(line + "\n" for line in lines))
    outdir.write_json(out / META_FILE, meta)
    return meta

"""`multitoken prepare`: turn a corpus into a DATA_DIR of token shards that training reads.

DATA_DIR holds:

- ``train.bin``, ``val.bin``: token shards (see `shards`); each document's tokens followed by
  EOS, documents in corpus order. The split is by a hash of each document's source id.
- ``tokenizer.json`` + ``tokenizer_config.json``: the tokenizer (``bpe:N`` is trained here, on
  the train split only, so validation text never shapes the vocabulary).
- ``meta.json``: what was prepared (corpus, tokenizer, its fingerprint, vocab_size, eos_id, dtype, per-split
  document and token counts, the validation sources), the data's fingerprint (``data_sha256``:
  sha256 over the tokenizer's fingerprint and both shard files, so two prepares that came out
  token for token identical have the same one) and the arguments that made it.

``meta.json`` is written last and removed first: its presence marks a complete DATA_DIR, and every
file is written to a temporary name and renamed, so a killed prepare never leaves a half file
that looks complete. ``--out`` must be a new or empty folder or a DATA_DIR of ours (outdir.py):
a folder holding other files is refused, so prepare never overwrites or deletes a user's file. Re-running with the same arguments reuses the DATA_DIR (``--force``
rebuilds). The corpus's documents are held in memory while preparing (fine up to a few GB of text).
"""

from __future__ import annotations

import logging
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from multitoken.data.corpora import STDLIB, Corpus, Document, split_documents
from multitoken.data.shards import ShardWriter, dtype_for_vocab, read_header
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import BadValue, UserError
from multitoken.io import outdir

log = logging.getLogger(__name__)

FORMAT = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
# Every file prepare writes into DATA_DIR (with the ownership marker of outdir.py): the only names
# whose leftover temporaries it deletes.
DATA_FILES = (META_FILE, "train.bin", "val.bin", "tokenizer.json", "tokenizer_config.json", outdir.MARKER_FILE)
DEFAULT_VAL_FRACTION = 0.02
MIN_SPLIT_TOKENS = 2  # one training window at the smallest --seq-len (1): an input token and its target
ENCODE_CHUNK_CHARS = 4 << 20  # text per encode_batch call: enough documents to keep every core busy


def prepare(
    corpus: str,
    tokenizer: str,
    out: str | Path,
    *,
    glob: str | None = None,
    field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_docs: int | None = None,
    include_tests: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `corpus` into DATA_DIR `out` (or reuse it if it already holds the same prepare).

    Args:
        corpus: ``python-stdlib`` or a path (see `corpora.Corpus`).
        tokenizer: ``bpe:N`` (trained on the train split), ``bytes``, or a tokenizer path.
        out: the DATA_DIR to write.
        glob: files of a directory corpus (default ``**/*.txt``).
        field: text field of .jsonl/.parquet/HF-dataset corpora.
        val_fraction: expected share of documents in the validation split.
        max_docs: read only the corpus's first N documents (in its deterministic order).
        include_tests: python-stdlib only: keep its test folders.
        force: rebuild even if `out` holds a complete prepare with the same arguments.
        progress: show a progress bar and stage messages on stderr.
    Returns:
        The contents of ``meta.json``, plus ``"reused": True/False``.
    """
    if max_docs is not None and max_docs < 1:
        raise BadValue("max_docs", max_docs, "give a positive number of documents")
    source = Corpus(corpus, glob=glob, field=field, include_tests=include_tests)
    out = Path(out)
    outdir.check(out, "prepare")  # a folder holding someone else's files is refused before anything is read or written
    args = _arguments(source, tokenizer, field, val_fraction, max_docs)
    if not force and _is_complete(out, args):
        return {**load_meta(out), "reused": True}
    say = log.info if progress else (lambda msg: None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    docs = list(itertools.islice(source, max_docs))
    train, val = split_documents(docs, val_fraction)
    _check_split_docs(source, len(docs), train, val, val_fraction)  # before the tokenizer trains on the train split
    seconds["read"] = time.perf_counter() - t
    # A tokenizer read from a path fails here, before `out` changes; bpe:N trains below.
    loaded = None if tokenizer.startswith("bpe:") else Tokenizer.from_spec(tokenizer)
    # Only now, with a corpus that can be prepared, does anything in `out` change.
    outdir.claim(out, "prepare")  # the ownership marker first: a killed prepare leaves a folder we still own
    outdir.remove_temporaries(out, DATA_FILES, fixed=[f"{s}.bin.tmp" for s in SPLITS])  # a killed run's leftovers
    (out / META_FILE).unlink(missing_ok=True)  # from here on, `out` is incomplete until meta.json is back

    t = time.perf_counter()
    if tokenizer.startswith("bpe:"):
        say(f"training {tokenizer} on {len(train)} train documents ({sum(len(d.text) for d in train) / 1e6:.1f}M characters)")
    tok = loaded or Tokenizer.from_spec(tokenizer, train_texts=(d.text for d in train), length=len(train))
    seconds["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    dtype = dtype_for_vocab(tok.vocab_size)
    counts: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr) as bar:
        for split, split_docs in zip(SPLITS, (train, val)):
            n = _write_split(out / f"{split}.bin", split_docs, tok, bar)
            counts[split] = {"docs": len(split_docs), "tokens": n, "file": f"{split}.bin"}
    _check_split_tokens(source, counts)
    seconds["encode"] = time.perf_counter() - t
    tok.save(out)
    fingerprint = _data_sha256(out, tok.fingerprint())

    meta = {
        "format": FORMAT,
        "corpus": source.name,
        "corpus_kind": source.kind,
        "tokenizer": tokenizer,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.fingerprint(),
        "eos_id": tok.eos_id,
        "eos_token": tok.eos_token,
        "bos_id": tok.bos_id,
        "dtype": dtype.name,
        "splits": counts,
        "data_sha256": fingerprint,
        "sources": {"val": [d.source for d in val], "train_sha1": _sources_sha1(train)},
        "skipped": [list(s) for s in source.skipped],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "args": args,
    }
    outdir.write_json(out / META_FILE, meta)
    return {**meta, "reused": False}


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete DATA_DIR.

    Raises:
        UserError: the directory is missing, incomplete or from an unknown format version.
    """
    d = Path(data_dir)
    fix = f"run `multitoken prepare --corpus ... --tokenizer ... --out {d}`"
    if not d.is_dir():
        raise UserError(f"DATA_DIR {d} does not exist: {fix}")
    f = d / META_FILE
    if not f.is_file():
        raise UserError(f"{d} holds no complete prepare (no {META_FILE}): {fix}")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{f} is not valid JSON: {fix} --force") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{d} was prepared in format {found}, this multitoken reads {FORMAT}: {fix} --force")
    check_meta(meta, d, f"{fix} --force")
    return meta


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_meta(meta: dict[str, Any], d: Path, fix: str) -> None:
    """Refuse a hand-edited ``meta.json`` whose fields would be trusted: every split present, its
    shard the one `prepare` names (never another split's file nor a path outside DATA_DIR), and
    counts that are whole numbers agreeing with the shard headers."""
    where = f"{d / META_FILE}"
    vocab, eos = meta.get("vocab_size"), meta.get("eos_id")
    if not (_count(vocab) and vocab > 0 and _count(eos) and eos < vocab):
        raise UserError(f"{where}: vocab_size {vocab!r} / eos_id {eos!r} are not a vocabulary size and an id in it: {fix}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        raise UserError(f"{where}: 'splits' must hold {' and '.join(SPLITS)} (found {str(splits)[:60]!r}): {fix}")
    for split in SPLITS:
        entry = splits[split]
        if entry.get("file") != f"{split}.bin":
            raise UserError(f"{where}: splits.{split}.file is {entry.get('file')!r}, not {split}.bin: {fix}")
        for key in ("tokens", "docs"):
            if not _count(entry.get(key)):
                raise UserError(f"{where}: splits.{split}.{key} is {entry.get(key)!r}, not a count: {fix}")
        shard = d / entry["file"]
        if shard.is_file() and read_header(shard).count != entry["tokens"]:
            raise UserError(f"{where}: splits.{split}.tokens is {entry['tokens']}, but {shard.name} holds "
                            f"{read_header(shard).count} tokens: {fix}")


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a DATA_DIR was prepared with."""
    meta = load_meta(data_dir)
    tok = Tokenizer.load(data_dir)
    if tok.vocab_size != meta["vocab_size"] or tok.eos_id != meta["eos_id"]:
        raise UserError(f"{data_dir}: tokenizer.json does not match meta.json (vocab/eos differ): re-run `multitoken prepare --force`")
    if meta.get("tokenizer_sha256") not in (None, tok.fingerprint()):
        raise UserError(f"{data_dir}: tokenizer.json is not the tokenizer the shards were made with (its fingerprint differs from "
                        "meta.json's): re-run `multitoken prepare --force`")
    return tok


def tokenizer_sha256(data_dir: str | Path) -> str:
    """The identity (`Tokenizer.fingerprint`) of a DATA_DIR's tokenizer: meta.json's record, or, for a DATA_DIR
    prepared before it was recorded, computed from its tokenizer files."""
    return load_meta(data_dir).get("tokenizer_sha256") or load_tokenizer(data_dir).fingerprint()


def data_sha256(data_dir: str | Path) -> str:
    """The fingerprint of a DATA_DIR's contents (see the module docstring): meta.json's record, or, for a
    DATA_DIR prepared before it was recorded, computed from its files."""
    meta = load_meta(data_dir)
    return meta.get("data_sha256") or _data_sha256(Path(data_dir), tokenizer_sha256(data_dir))


def shard_path(data_dir: str | Path, split: str) -> Path:
    """The shard file of `split` ('train' or 'val') in a complete DATA_DIR."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return Path(data_dir) / load_meta(data_dir)["splits"][split]["file"]


# ---- CLI --------------------------------------------------------------------------------------


def summary(meta: dict[str, Any], out: str | Path) -> str:
    """A few readable lines describing a prepared DATA_DIR."""
    verb = "reused" if meta.get("reused") else "prepared"
    lines = [f"{verb} {out} from {meta['corpus']} ({meta['corpus_kind']})"
             + ("  (same arguments as before; --force rebuilds)" if meta.get("reused") else "")]
    lines.append(f"tokenizer {meta['tokenizer']}: vocab {meta['vocab_size']}, eos {meta['eos_token']!r} = {meta['eos_id']}, shards {meta['dtype']}")
    lines.append(f"{'split':<6} {'docs':>9} {'tokens':>13}")
    for split in SPLITS:
        s = meta["splits"][split]
        lines.append(f"{split:<6} {s['docs']:>9,} {s['tokens']:>13,}")
    for split in SPLITS:
        n = meta["splits"][split]["tokens"]
        if n < _default_seq_len() + 1:
            hint = f"train with --seq-len {n - 1} or less, or prepare a bigger corpus" if n >= MIN_SPLIT_TOKENS else "prepare a bigger corpus"
            lines.append(f"note: {split} holds {n} tokens, fewer than one window of train's default --seq-len {_default_seq_len()}: {hint}")
    if meta["skipped"]:
        lines.append(f"skipped {len(meta['skipped'])} file(s), e.g. {meta['skipped'][0][0]} ({meta['skipped'][0][1]})")
    if not meta.get("reused"):
        lines.append("time   " + "  ".join(f"{k} {v:.1f}s" for k, v in meta["seconds"].items()))
    return "\n".join(lines)


# ---- helpers ----------------------------------------------------------------------------------


def _write_split(path: Path, docs: list[Document], tok: Tokenizer, bar: tqdm) -> int:
    """Encode `docs` in parallel chunks and write them, each followed by EOS, to one shard."""
    with ShardWriter(path, tok.vocab_size) as w:
        for chunk in _chunks(docs):
            flat: list[int] = []
            for ids in tok.encode_batch([d.text for d in chunk]):
                flat.extend(ids)
                flat.append(tok.eos_id)
            w.write(np.asarray(flat, dtype=np.int64))
            bar.update(len(chunk))
    return w.count


def _chunks(docs: list[Document]) -> list[list[Document]]:
    out: list[list[Document]] = [[]]
    size = 0
    for d in docs:
        if size >= ENCODE_CHUNK_CHARS:
            out.append([])
            size = 0
        out[-1].append(d)
        size += len(d.text)
    return [c for c in out if c]


def _arguments(source: Corpus, tokenizer: str, field: str, val_fraction: float, max_docs: int | None) -> dict[str, Any]:
    """Everything that determines a DATA_DIR's contents; equal arguments mean the DATA_DIR can be reused."""
    args: dict[str, Any] = {"format": FORMAT, "corpus": source.name, "kind": source.kind, "max_docs": max_docs, "val_fraction": val_fraction}
    if source.kind == STDLIB:
        args.update(python=sys.version.split()[0], include_tests=source.include_tests)
    if source.kind == "dir":
        args["glob"] = source.glob
    if source.kind in ("dir", "jsonl", "parquet", "hf-dataset"):
        args["field"] = field
    if tokenizer == "bytes" or tokenizer.startswith("bpe:"):
        args["tokenizer"] = tokenizer
    else:  # a path: its identity and version, so an edited tokenizer is not silently reused
        p = Path(tokenizer).expanduser()
        f = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else p
        st = f.stat() if f.exists() else None
        args["tokenizer"] = str(p.resolve())
        args["tokenizer_file"] = f"{st.st_size}:{st.st_mtime_ns}" if st else None
    return args


def _is_complete(out: Path, args: dict[str, Any]) -> bool:
    """Whether `out` holds a finished prepare made with `args`, its shards intact."""
    try:
        meta = load_meta(out)
        if meta.get("args") != args or not (out / "tokenizer.json").is_file():
            return False
        return all(read_header(out / meta["splits"][s]["file"]).count == meta["splits"][s]["tokens"] for s in SPLITS)
    except (UserError, KeyError, TypeError):
        return False


def _check_split_docs(source: Corpus, n_docs: int, train: list[Document], val: list[Document], val_fraction: float) -> None:
    """Refuse a split that leaves train (the tokenizer's training text too) or validation without documents."""
    if train and val:
        return
    empty = "train" if not train else "validation"
    if val_fraction == 0:
        fix = "give --val-fraction above 0 (e.g. 0.02): training evaluates on the validation split"
    else:
        fix = (f"the corpus has only {n_docs} document(s): use a bigger corpus of at least 2 documents "
               "(a .txt file is cut at blank lines, a folder gives one document per file)")
    raise UserError(f"prepare would leave the {empty} split of {source.spec} empty ({len(train)} train, {len(val)} validation "
                    f"documents at --val-fraction {val_fraction}): {fix}")


def _check_split_tokens(source: Corpus, counts: dict[str, dict[str, Any]]) -> None:
    """Refuse a split too short to make one training window of any --seq-len."""
    for split in SPLITS:
        n = counts[split]["tokens"]
        if n < MIN_SPLIT_TOKENS:
            fix = "a larger --val-fraction or a bigger corpus" if split == "val" else "a bigger corpus"
            raise UserError(f"the {split} split of {source.spec} holds {n} token(s), fewer than the {MIN_SPLIT_TOKENS} of one "
                            f"training window: use {fix}")


def _default_seq_len() -> int:
    from multitoken.config import TrainConfig

    return TrainConfig.seq_len


def _data_sha256(out: Path, tokenizer_fingerprint: str) -> str:
    """sha256 over the tokenizer's fingerprint, then each split's shard file (header and tokens) in SPLITS order."""
    h = hashlib.sha256(tokenizer_fingerprint.encode())
    for split in SPLITS:
        with open(out / f"{split}.bin", "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _sources_sha1(docs: list[Document]) -> str:
    h = hashlib.sha1()
    for d in docs:
        h.update(d.source.encode("utf-8") + b"\n")
    return h.hexdigest()

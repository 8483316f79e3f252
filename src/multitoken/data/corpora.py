"""Corpora: where training text comes from, as documents with a stable source id.

`Corpus` reads one of:

- ``python-stdlib``: the running interpreter's standard-library ``.py`` files (a real code
  corpus that every machine has, so tests and demos need no download). Test folders
  (``test/``, ``tests/``, ``idlelib/idle_test/``), site-packages, generated files
  (``pydoc_data/topics.py``, ``_sysconfigdata_*.py``, ``config-*/``), files over 1 MB and files
  that are not UTF-8 are left out.
- a directory: every file matching ``glob`` (default ``**/*.txt``), in sorted path order; a
  text file is one document, a ``.jsonl`` or ``.parquet`` file contributes one per row.
- a single text file: one document per paragraph (blank-line separated), so that one big file
  such as a book still gets a validation split; a directory is the way to get one document
  per file.
- a ``.jsonl`` file (one JSON object per line, the text under ``field``), a ``.parquet`` file
  (column ``field``), or a Hugging Face dataset saved with ``datasets.save_to_disk`` (column
  ``field``; every split of a DatasetDict, in sorted split order).

Text must be UTF-8. A single-file corpus that is not is refused, naming the file, the offending
byte and its offset; a directory skips such files (listed in `Corpus.skipped`, and named in the
error if nothing readable is left); a .jsonl line that is not is refused, naming the line.

Empty (whitespace-only) documents are dropped. Every document has a ``source`` id that does not depend on where the
corpus lives (a relative path, ``file.jsonl#row``), and the train/validation split is a
function of that id alone (`is_validation`): adding or removing other documents never moves a
document between splits, and the same corpus splits the same way on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

STDLIB = "python-stdlib"
DEFAULT_GLOB = "**/*.txt"
MAX_STDLIB_FILE = 1 << 20  # bytes; larger stdlib files are generated tables, not code
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB_GENERATED = frozenset({"pydoc_data/topics.py"})
ROW_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    """One document: its text and an id that is stable across machines and runs."""

    source: str
    text: str


@dataclass
class Corpus:
    """A readable corpus; iterate it for `Document`s in a deterministic order.

    Construction checks that the corpus exists and what kind it is; reading happens on iteration.
    """

    spec: str
    """``python-stdlib`` or a path (directory, text file, .jsonl, .parquet, saved HF dataset)."""
    glob: str | None = None
    """Files of a directory corpus to read (default ``**/*.txt``)."""
    field: str = "text"
    """Field holding the text in .jsonl, .parquet and HF dataset corpora."""
    include_tests: bool = False
    """For python-stdlib: keep the test folders (about 2.5x more text)."""
    skipped: list[tuple[str, str]] = dc_field(default_factory=list, init=False)
    """(source, reason) for files left out during the last iteration."""
    kind: str = dc_field(default="", init=False)
    """'python-stdlib', 'dir', 'txt', 'jsonl', 'parquet' or 'hf-dataset' (set from `spec`)."""
    root: Path = dc_field(default=Path(), init=False)
    """Where the corpus lives."""
    _not_utf8: list[str] = dc_field(default_factory=list, init=False, repr=False)
    # why each skipped file is not UTF-8, for the error when nothing readable is left

    def __post_init__(self) -> None:
        if self.spec == STDLIB:
            self.root = Path(sysconfig.get_paths()["stdlib"])
            self.kind = STDLIB
            return
        self.root = Path(self.spec).expanduser()
        if not self.root.exists():
            raise UserError(f"corpus {self.spec} does not exist: give {STDLIB}, a directory, or a .txt/.jsonl/.parquet file")
        self.kind = _kind_of(self.root)
        if self.glob is not None and self.kind != "dir":
            raise UserError(f"--glob applies to directory corpora, and {self.spec} is a {self.kind} corpus: drop --glob")

    @property
    def name(self) -> str:
        """``python-stdlib`` or the resolved path."""
        return STDLIB if self.kind == STDLIB else str(self.root.resolve())

    def __iter__(self) -> Iterator[Document]:
        self.skipped = []
        self._not_utf8 = []
        n = 0
        for doc in self._documents():
            if doc.text.strip():
                n += 1
                yield doc
        if n == 0:
            if self._not_utf8:
                first, count = self._not_utf8[0], len(self._not_utf8)
                raise UserError(f"corpus {self.spec} has no documents: {count} matching file(s) are not UTF-8, e.g. {first}: "
                                "convert them to UTF-8")
            what = f" (glob {self.glob or DEFAULT_GLOB} matched no readable file with text)" if self.kind == "dir" else ""
            raise UserError(f"corpus {self.spec} has no documents{what}: point --corpus at text, or fix --glob/--field")

    def _documents(self) -> Iterator[Document]:
        if self.kind == STDLIB:
            yield from self._stdlib()
        elif self.kind == "dir":
            yield from self._directory()
        elif self.kind == "hf-dataset":
            yield from _hf_rows(self.root, self.field)
        else:
            yield from self._file(self.root, self.root.name)

    def _file(self, path: Path, source: str) -> Iterator[Document]:
        if path.suffix == ".jsonl":
            yield from _jsonl_rows(path, source, self.field)
        elif path.suffix == ".parquet":
            yield from _parquet_rows(path, source, self.field)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:  # the whole corpus: refuse rather than skip
                raise UserError(f"{path} {_not_utf8(e)}: convert it to UTF-8") from None
            paragraphs = (p.strip("\n") for p in re.split(r"\n[ \t\r\f\v]*\n", text or ""))
            for i, para in enumerate(p for p in paragraphs if p.strip()):
                yield Document(f"{source}#{i}", para)

    def _directory(self) -> Iterator[Document]:
        files = sorted((p for p in self.root.glob(self.glob or DEFAULT_GLOB) if p.is_file()), key=lambda p: p.relative_to(self.root).as_posix())
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            if path.suffix in ROW_SUFFIXES:
                yield from self._file(path, rel)
            else:
                text = self._read_text(path, rel)
                if text is not None:
                    yield Document(rel, text)

    def _stdlib(self) -> Iterator[Document]:
        for path in stdlib_files(self.include_tests):
            rel = path.relative_to(self.root).as_posix()
            if path.stat().st_size > MAX_STDLIB_FILE:
                self.skipped.append((rel, "larger than 1 MB"))
                continue
            text = self._read_text(path, rel)
            if text is not None:
                yield Document(rel, text)

    def _read_text(self, path: Path, source: str) -> str | None:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            self.skipped.append((source, "not UTF-8"))
            self._not_utf8.append(f"{source} {_not_utf8(e)}")
            return None


def iter_documents(corpus: str, glob: str | None = None, field: str = "text", include_tests: bool = False) -> Iterator[Document]:
    """Documents of a corpus (see `Corpus` for the arguments); raises UserError if there are none."""
    return iter(Corpus(corpus, glob=glob, field=field, include_tests=include_tests))


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The standard library's .py files that make up the python-stdlib corpus, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        dirs = set(rel.parts[:-1])
        if dirs & STDLIB_SKIP_DIRS or (not include_tests and dirs & STDLIB_TEST_DIRS):
            continue
        if rel.parts[0].startswith("config-") or rel.name.startswith("_sysconfigdata") or rel.as_posix() in STDLIB_GENERATED:
            continue
        out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def is_validation(source: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: sha1 of its source id, as a number in [0, 1)."""
    return _unit_hash(source) < val_fraction


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by `is_validation`, keeping their order.

    With at least two documents, each split gets at least one (when `val_fraction` > 0): if
    the hash rule leaves one empty, the document with the smallest (for val) or largest (for
    train) hash moves, so the result is still a function of the source ids alone.

    Args:
        docs: the corpus's documents.
        val_fraction: expected share of documents in validation, in [0, 1).
    Returns:
        (train, val).
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction {val_fraction} must be in [0, 1): e.g. 0.02")
    val_ids = {i for i, d in enumerate(docs) if is_validation(d.source, val_fraction)}
    if val_fraction > 0 and len(docs) >= 2:
        if not val_ids:
            val_ids = {min(range(len(docs)), key=lambda i: _unit_hash(docs[i].source))}
        elif len(val_ids) == len(docs):
            val_ids.discard(max(range(len(docs)), key=lambda i: _unit_hash(docs[i].source)))
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


# ---- readers ----------------------------------------------------------------------------------


def _not_utf8(e: UnicodeDecodeError, base: int = 0) -> str:
    """'is not UTF-8 (invalid start byte 0xff at offset 12)': what and where, for an error message."""
    return f"is not UTF-8 ({e.reason} 0x{e.object[e.start]:02x} at byte offset {base + e.start})"


def _unit_hash(source: str) -> float:
    return int.from_bytes(hashlib.sha1(source.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _kind_of(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
            return "hf-dataset"
        return "dir"
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    return "txt"


def _text_of(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""  # a missing value is an empty document, dropped like one
    raise UserError(f"{where}: field {field!r} holds {type(value).__name__}, not text: pass --field naming a text field")


def _jsonl_rows(path: Path, source: str, field: str) -> Iterator[Document]:
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {i + 1} {_not_utf8(e, offset)}: convert the file to UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {i + 1} is not valid JSON: fix the file (one JSON object per line)") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path} line {i + 1} has no field {field!r} (has: {keys}): pass --field")
            yield Document(f"{source}#{i}", _text_of(row[field], f"{path} line {i + 1}", field))


def _parquet_rows(path: Path, source: str, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq  # only parquet corpora need it
    except ImportError:
        raise UserError("parquet corpora need pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for non-parquet files
        raise UserError(f"{path} is not a readable parquet file ({e}): fix or remove it") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column {field!r} (has: {', '.join(names)}): pass --field")
    i = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield Document(f"{source}#{i}", _text_of(value, f"{path} row {i}", field))
            i += 1


def _hf_rows(path: Path, field: str) -> Iterator[Document]:
    try:
        import datasets  # only saved-dataset corpora need it
    except ImportError:
        raise UserError("Hugging Face dataset corpora need datasets: pip install datasets") from None
    loaded = datasets.load_from_disk(str(path))
    splits = {"": loaded} if isinstance(loaded, datasets.Dataset) else dict(sorted(loaded.items()))
    for split, ds in splits.items():
        if field not in ds.column_names:
            raise UserError(f"dataset {path} has no column {field!r} (has: {', '.join(ds.column_names)}): pass --field")
        prefix = f"{path.name}/{split}" if split else path.name
        i = 0
        for batch in ds.select_columns([field]).iter(batch_size=1024):
            for value in batch[field]:
                yield Document(f"{prefix}#{i}", _text_of(value, f"dataset {path} row {i}", field))
                i += 1

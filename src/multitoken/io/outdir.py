"""Output folders we own: atomic writes, an ownership marker, and cleanup of our own temporaries.

Every command that writes an ``--out`` folder (train, prepare, convert, retrofit, export) first
claims it with `claim`: the folder must be new, empty, or already ours. "Ours" means it holds
the marker file ``.multitoken.json`` (``{"multitoken": KIND, "format": 1}``, written before
anything else), or, for folders made before the marker existed, a ``config.json`` whose "model"
section parses as a `ModelConfig` and carries the section its command writes ("train",
"source", "retrofit"), or a DATA_DIR ``meta.json`` of our format. A user's own ``config.json``
does not pass that test: `ModelConfig` rejects every key it does not know. Anything else is
refused with a one-line error, so a user's files are never overwritten or deleted.

An ``--out`` inside a folder of ours (``run1/checkpoints/step_00000006``) is refused too, except
where a command nests its own folders (a study's runs, a retrofit's features). While a command
writes a folder it holds an exclusive lock on ``.multitoken.lock`` in it (`locked`), so a second
process on the same ``--out`` is refused in one line instead of interleaving its files.

Deletion only ever hits temporaries we create, by their exact names, in folders we own:
``.NAME.XXXXXXXX.tmp`` (what `atomic_write` makes for file NAME through `tempfile.mkstemp`) for
the names a command writes, and safetensors' own ``.tmpXXXXXX`` (its writer renames that onto
our temporary; a kill in between leaves it), never a recursive sweep. Files are written with the
mode ``open()`` would give them (0666 less the umask), not mkstemp's 0600. This module imports
no torch, so the data side (tokenizer, prepare) shares the one implementation of atomic writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

from multitoken.errors import UserError

MARKER_FILE = ".multitoken.json"
MARKER_FORMAT = 1
LOCK_FILE = ".multitoken.lock"
# safetensors' writer makes ".tmp" + 6 letters/digits beside the file it writes (the tempfile crate).
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")

# What each command's folder is called in messages, and what the fix is when --out is not one.
KINDS = {
    "train": "a training run",
    "prepare": "a DATA_DIR of `multitoken prepare`",
    "convert": "a run written by `multitoken convert`",
    "retrofit": "a run written by `multitoken retrofit`",
    "export": "a folder written by `multitoken export`",
    "speculators": "a speculators folder of `multitoken export --format speculators`",
    "features": "a backbone feature set of `multitoken retrofit`",
    "ablate": "a study folder of `multitoken ablate`",
    "bench": "a results folder of `multitoken bench`",
    "results": "a results folder of `multitoken ablate --results`",
}
BENCH_FILES = ("decode.json", "decode.png", "train.json", "train.png")
# (parent kind, kind): folders a command nests inside its own; any other --out inside a folder of ours is refused.
NESTED = {("ablate", "train"), ("retrofit", "features")}


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto `path` (same filesystem).

    The temporary is ``.{name}.XXXXXXXX.tmp`` next to `path` (`temporary_pattern` matches it);
    a killed process leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp (and safetensors) make 0600 files: give what open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def temporary_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """The names `atomic_write` gives the temporaries of files `names` (mkstemp's random part is
    lowercase letters, digits and underscores)."""
    alternatives = "|".join(re.escape(n) for n in sorted(names))
    return re.compile(rf"\.(?:{alternatives})\.[a-z0-9_]+\.tmp")


def remove_temporaries(folder: str | Path, names: Iterable[str], fixed: Iterable[str] = ()) -> int:
    """Delete the leftover temporaries of files `names` in `folder` itself (not in subfolders),
    safetensors' own ``.tmpXXXXXX`` ones, plus the exact file names in `fixed`. Returns how many
    files went."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern, fixed, n = temporary_pattern(names), set(fixed), 0
    for p in folder.iterdir():
        if (pattern.fullmatch(p.name) or SAFETENSORS_TMP.fullmatch(p.name) or p.name in fixed) and p.is_file() \
                and not p.is_symlink():
            p.unlink()
            n += 1
    return n


def owner(folder: str | Path) -> str | None:
    """Which command's folder `folder` is (a key of `KINDS`), or None when it is not ours."""
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if marker.is_file():
        data = _json_or_none(marker)
        if isinstance(data, dict) and data.get("multitoken") in KINDS:
            return data["multitoken"]
        return None
    return _legacy_owner(folder)


def check(folder: str | Path, kind: str, option: str = "--out") -> None:
    """Raise a one-line `UserError` unless `folder` is new, empty, or a `kind` folder of ours.

    Nothing is written: safe to call on every process of a distributed job.
    """
    folder = Path(folder)
    _check_parents(folder, kind, option)
    if not folder.exists():
        if folder.is_symlink():
            raise UserError(f"{option} {folder} is a broken link: choose a new folder")
        return
    if not folder.is_dir():
        raise UserError(f"{option} {folder} is a file: give a folder (a new or empty one)")
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return
    found = owner(folder)
    if found == kind:
        return
    if found is not None:
        raise UserError(f"{option} {folder} is {KINDS[found]}, not {KINDS[kind]}: choose a new or empty folder")
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise UserError(f"{option} {folder} holds files multitoken did not write ({shown}): choose a new or empty "
                    f"folder (nothing in it was changed)")


def claim(folder: str | Path, kind: str, option: str = "--out") -> Path:
    """`check` `folder`, create it if needed and write the ownership marker (first, before any
    other file) unless it is there already. Returns the folder."""
    folder = Path(folder)
    check(folder, kind, option)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER_FILE).is_file():
        write_json(folder / MARKER_FILE, {"multitoken": kind, "format": MARKER_FORMAT})
    return folder


@contextlib.contextmanager
def locked(folder: str | Path, kind: str, option: str = "--out") -> Iterator[Path]:
    """`check` `folder`, create it and hold an exclusive lock on it while the block runs, so that a
    second process writing the same folder is refused in one line. The lock file goes again at the
    end, and so does a folder this call created that is still empty (the command failed early).

    Yields:
        The folder.
    """
    folder = Path(folder)
    check(folder, kind, option)
    created = not folder.exists()
    lock = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, folder, option)
    except OSError as e:
        raise UserError(f"{option} {folder}: cannot write there ({e.strerror}): choose a folder you can write") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, multitoken {kind}\n".encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it: `_acquire` retries when the file it locked went
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def _acquire(lock: Path, folder: Path, option: str) -> int:
    """An open descriptor holding the exclusive lock on `lock`, or a one-line `UserError` naming the
    holder. A lock file unlinked by its releasing holder between our open and our lock is retried."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{option} {folder} is in use by another multitoken process ({holder}): wait for it to "
                            f"finish or choose another folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _check_parents(folder: Path, kind: str, option: str) -> None:
    """Refuse a `folder` inside a folder of ours (other than the nestings of `NESTED`)."""
    for parent in folder.absolute().parents:
        if not (parent / MARKER_FILE).is_file() and not (parent / "config.json").is_file() \
                and not (parent / "meta.json").is_file():
            continue  # cheap test first: most parents are not ours
        found = owner(parent)
        if found is not None and (found, kind) not in NESTED:
            raise UserError(f"{option} {folder} is inside {parent}, which is {KINDS[found]}: choose a folder outside it "
                            f"(its own files would be mixed with this one's)")


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _legacy_owner(folder: Path) -> str | None:
    """Recognise a run or DATA_DIR written before the marker existed, by content, strictly."""
    meta = _json_or_none(folder / "meta.json") if (folder / "meta.json").is_file() else None
    if isinstance(meta, dict) and meta.get("format") == 1 and isinstance(meta.get("args"), dict) \
            and meta["args"].get("format") == 1 and isinstance(meta.get("splits"), dict):
        return "prepare"
    entries = {p.name for p in folder.iterdir()} - {LOCK_FILE}
    if entries and entries <= set(BENCH_FILES):  # bench results of before the marker: our JSON's "command"
        results = [_json_or_none(folder / n) for n in sorted(entries) if n.endswith(".json")]
        if results and all(isinstance(r, dict) and str(r.get("command", "")).startswith("multitoken bench")
                           for r in results):
            return "bench"
    features = _json_or_none(folder / "features.json") if (folder / "features.json").is_file() else None
    if isinstance(features, dict) and features.get("format") == 1 and isinstance(features.get("args"), dict) \
            and "kind" in features["args"]:
        return "features"
    config = _json_or_none(folder / "config.json") if (folder / "config.json").is_file() else None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        return None
    from multitoken.config import ModelConfig, from_dict

    if not {"vocab_size", "dim", "n_layers", "heads"} <= config["model"].keys():
        return None
    try:
        from_dict(ModelConfig, config["model"])  # unknown keys are refused: a user's config.json fails here
    except (UserError, TypeError, ValueError, KeyError):
        return None
    for section, kind in (("train", "train"), ("source", "convert"), ("retrofit", "retrofit")):
        if isinstance(config.get(section), dict):
            return kind
    return None

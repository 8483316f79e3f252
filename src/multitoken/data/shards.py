"""Token shards: one flat array of token ids on disk, writer and reader side by side.

Layout (little-endian), a fixed 32-byte header then the tokens:

    offset  size  field
    0       8     magic b"MTTOKENS"
    8       4     format version (uint32, currently 1)
    12      4     dtype code (uint32): 1 = uint16, 2 = uint32
    16      8     token count (uint64)
    24      8     reserved (zero)
    32      ...   count tokens of that dtype

uint16 is used whenever every id fits (vocabulary <= 65536), halving disk and page-cache use.
The reader memory-maps the tokens, so a loader touches only the windows it samples. The count
is written last and the file renamed into place only when complete, so a reader can always tell
a finished shard from a truncated or foreign file, and says which, naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Iterable

import numpy as np

from multitoken.errors import UserError

MAGIC = b"MTTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, count, reserved
HEADER_SIZE = HEADER.size  # 32
DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
FIX = "re-run `multitoken prepare`"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size <= 1 << 16:
        return DTYPES[1]
    if vocab_size <= 1 << 32:
        return DTYPES[2]
    raise UserError(f"vocabulary of {vocab_size} ids does not fit in uint32 shards: use a smaller tokenizer")


def _code(dtype: np.dtype) -> int:
    return next(c for c, d in DTYPES.items() if d == dtype)


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says."""

    version: int
    dtype: np.dtype
    count: int


class ShardWriter:
    """Append tokens to a new shard; the file appears at `path` only when closed without error.

    Use as a context manager::

        with ShardWriter(path, vocab_size) as w:
            w.write(ids)
    """

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        """Args:
            path: the shard to create (replaced if it exists, but only on success).
            vocab_size: the tokenizer's vocabulary size; picks the dtype and bounds the ids.
        """
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(HEADER.pack(MAGIC, VERSION, _code(self.dtype), 0))  # count filled in by close()

    def write(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append token ids (a list or an integer array)."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.vocab_size})")
        self._f.write(arr.astype(self.dtype).tobytes())
        self.count += int(arr.size)

    def close(self) -> None:
        """Write the final count, flush to disk and rename the shard into place."""
        if self._f.closed:
            return
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, VERSION, _code(self.dtype), self.count))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial shard."""
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | Path, ids: Iterable[int] | np.ndarray, vocab_size: int) -> int:
    """Write all of `ids` as one shard.

    Returns:
        The number of tokens written.
    """
    with ShardWriter(path, vocab_size) as w:
        w.write(ids)
    return w.count


def read_header(path: str | Path) -> ShardHeader:
    """Read and check a shard's header and size.

    Raises:
        UserError: missing file, foreign file (wrong magic), unknown version or dtype, or a file
            whose size does not match its token count.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"token shard {p} does not exist: {FIX}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if raw[: len(MAGIC)] != MAGIC[: len(raw)]:  # a file cut inside the magic counts as truncated, not foreign
        raise UserError(f"{p} is not a multitoken token shard (bad magic bytes {raw[:8]!r}): point at a DATA_DIR made by `multitoken prepare`")
    if len(raw) < HEADER_SIZE:
        raise UserError(f"{p} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header; {FIX}")
    _, version, code, count = HEADER.unpack(raw)
    if version != VERSION:
        raise UserError(f"{p} has shard format version {version}, this multitoken reads version {VERSION}: {FIX} with this version")
    if code not in DTYPES:
        raise UserError(f"{p} has unknown dtype code {code}: the file is damaged; {FIX}")
    dtype = DTYPES[code]
    held = (size - HEADER_SIZE) // dtype.itemsize
    if size - HEADER_SIZE != count * dtype.itemsize:
        what = "truncated" if held < count else "corrupt"
        raise UserError(f"{p} is {what}: header says {count} tokens, file holds {held}; {FIX}")
    return ShardHeader(version=version, dtype=dtype, count=count)


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only, dtype uint16 or uint32).

    Returns:
        A 1-D array of `count` tokens; pages are read from disk only when touched.
    """
    h = read_header(path)
    if h.count == 0:
        return np.empty(0, dtype=h.dtype)  # numpy cannot map a zero-length region
    return np.memmap(path, dtype=h.dtype, mode="r", offset=HEADER_SIZE, shape=(h.count,))

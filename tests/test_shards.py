"""Token shards: round trips in both dtypes, atomic writes, and clear errors on damaged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multitoken.data.shards import HEADER_SIZE, ShardWriter, dtype_for_vocab, read_header, read_shard, write_shard
from multitoken.errors import UserError


def test_dtype_choice() -> None:
    assert dtype_for_vocab(257) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


@pytest.mark.parametrize("vocab", [300, 65536, 200_000])
def test_round_trip(vocab: int, tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, vocab, size=1000)
    path = tmp_path / "a.bin"
    with ShardWriter(path, vocab) as w:
        w.write(ids[:400])
        w.write(ids[400:].tolist())
        w.write([])
    assert w.count == 1000 and not (tmp_path / "a.bin.tmp").exists()
    got = read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == dtype_for_vocab(vocab)
    np.testing.assert_array_equal(got, ids)
    assert path.stat().st_size == HEADER_SIZE + 1000 * got.dtype.itemsize


def test_empty_shard(tmp_path: Path) -> None:
    assert write_shard(tmp_path / "e.bin", [], 10) == 0
    assert len(read_shard(tmp_path / "e.bin")) == 0


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    write_shard(path, [1, 2, 3], 10)
    with pytest.raises(RuntimeError):
        with ShardWriter(path, 10) as w:
            w.write([4, 5])
            raise RuntimeError("killed")
    np.testing.assert_array_equal(read_shard(path), [1, 2, 3])  # the old shard is untouched
    assert not (tmp_path / "a.bin.tmp").exists()


def test_out_of_vocab_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(tmp_path / "a.bin", [1, 10], 10)


def test_truncated(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    write_shard(path, range(100), 1000)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"train\.bin is truncated: header says 100 tokens, file holds 95; re-run `multitoken prepare`"):
        read_shard(path)
    path.write_bytes(data[:12])
    with pytest.raises(UserError, match="truncated"):
        read_header(path)
    path.write_bytes(data + b"\0\0")
    with pytest.raises(UserError, match="corrupt"):
        read_shard(path)


def test_foreign_and_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UserError, match=r"x\.bin is not a multitoken token shard"):
        read_shard(path)
    write_shard(path, [1, 2], 10)
    data = bytearray(path.read_bytes())
    data[8] = 99  # version field
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="format version 99"):
        read_shard(path)
    with pytest.raises(UserError, match="does not exist"):
        read_shard(tmp_path / "missing.bin")

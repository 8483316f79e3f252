"""Token shards: round trips in both dtypes, atomic writes, and clear errors on damaged files."""

from __future__ import annotations

import struct
import zlib
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


# ---- payload damage: checksum and vocabulary range, verified once on open ----------------------


def reseal(path: Path) -> None:
    """Recompute a shard's CRC-32 the way the format documents it (zlib over the token bytes), so
    damage that keeps the checksum consistent can be tested."""
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", zlib.crc32(bytes(data[HEADER_SIZE:])))
    path.write_bytes(bytes(data))


def test_checksum_is_crc32_of_the_tokens(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    ids = np.random.default_rng(1).integers(0, 300, size=5000)
    with ShardWriter(path, 300) as w:  # several writes: the checksum is carried across them
        for part in np.array_split(ids, 7):
            w.write(part)
    data = path.read_bytes()
    assert data[24:28] == struct.pack("<I", zlib.crc32(ids.astype("<u2").tobytes()))
    assert read_header(path).crc32 == zlib.crc32(data[HEADER_SIZE:])


@pytest.mark.parametrize("where", [0, 1, 2999])  # first token, a high byte, the last token
def test_one_corrupted_payload_byte_is_refused(tmp_path: Path, where: int) -> None:
    path = tmp_path / "train.bin"
    write_shard(path, np.arange(3000), 1 << 16)
    np.testing.assert_array_equal(read_shard(path), np.arange(3000))
    data = bytearray(path.read_bytes())
    byte = HEADER_SIZE + (2 * where if where != 1 else 3)
    data[byte] ^= 0x01  # every uint16 is inside this vocabulary: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train\.bin is damaged: the checksum .* --force") as e:
        read_shard(path, vocab_size=1 << 16)
    assert str(tmp_path / "train.bin") in str(e.value) and "\n" not in str(e.value)


def test_id_outside_the_vocabulary_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "val.bin"
    ids = np.random.default_rng(2).integers(0, 257, size=10_000)
    write_shard(path, ids, 257)
    data = bytearray(path.read_bytes())  # token 7321 becomes 300, past the vocabulary; resealed, so only the range check sees it
    data[HEADER_SIZE + 2 * 7321 : HEADER_SIZE + 2 * 7322] = struct.pack("<H", 300)
    path.write_bytes(bytes(data))
    reseal(path)
    assert len(read_shard(path)) == 10_000  # the checksum is consistent
    with pytest.raises(UserError, match=r"val\.bin is damaged: token 300 at token offset 7321 is outside the vocabulary \[0, 257\)"):
        read_shard(path, vocab_size=257)
    assert len(read_shard(path, vocab_size=301)) == 10_000


def test_version_1_shard_loads_with_a_one_line_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.bin"
    ids = np.arange(100, dtype="<u2")
    path.write_bytes(b"MTTOKENS" + struct.pack("<IIQ8x", 1, 1, 100) + ids.tobytes())  # version 1: no checksum
    np.testing.assert_array_equal(read_shard(path, vocab_size=100), ids)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {path} is a version-1 token shard without a checksum")
    read_shard(path)
    assert capsys.readouterr().err == ""  # once per file
    with pytest.raises(UserError, match="token 99 at token offset 99 is outside"):  # ids are still checked
        read_shard(path, vocab_size=99)

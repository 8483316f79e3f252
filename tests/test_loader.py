"""TokenLoader: windows are contiguous, order is seeded, resume is exact, DDP ranks slice one global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.data.loader import TokenLoader
from multitoken.data.prepare import prepare
from multitoken.data.shards import write_shard
from multitoken.errors import UserError

N_TOKENS = 2000
T = 16


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """Token i is i: a window's values are its position, so order and contiguity are visible."""
    path = tmp_path / "train.bin"
    write_shard(path, np.arange(N_TOKENS), N_TOKENS)
    return path


def take(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def test_windows(shard: Path) -> None:
    loader = TokenLoader(shard, batch_size=4, seq_len=T)
    b = next(loader)
    assert b.shape == (4, T + 1) and b.dtype == torch.int64
    assert torch.equal(b - b[:, :1], torch.arange(T + 1).expand(4, -1))  # each row is one contiguous window


def test_epoch_sees_each_window_once_and_moves_boundaries(shard: Path) -> None:
    loader = TokenLoader(shard, batch_size=1, seq_len=T)
    per_epoch = len(loader._epoch_starts)
    assert per_epoch >= (N_TOKENS - 1) // T - 1
    firsts = [int(next(loader)[0, 0]) for _ in range(per_epoch)]
    phase = firsts[0] % T
    assert sorted(firsts) == list(range(phase, phase + per_epoch * T, T))
    later = [int(next(loader)[0, 0]) for _ in range(3 * per_epoch)]
    assert loader.epoch == 3 and len({s % T for s in later}) > 1  # a new phase each epoch


def test_seeded(shard: Path) -> None:
    a = take(TokenLoader(shard, batch_size=3, seq_len=T, seed=1), 5)
    b = take(TokenLoader(shard, batch_size=3, seq_len=T, seed=1), 5)
    c = take(TokenLoader(shard, batch_size=3, seq_len=T, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop", [1, 7, 40, 41])  # 40 batches of 3 end near the first epoch (124 windows)
def test_exact_resume(shard: Path, stop: int) -> None:
    whole = take(TokenLoader(shard, batch_size=3, seq_len=T, seed=5), 60)
    first = TokenLoader(shard, batch_size=3, seq_len=T, seed=5)
    take(first, stop)
    state = first.state_dict()
    resumed = TokenLoader(shard, batch_size=3, seq_len=T, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 60 - stop), whole[stop:]))


def test_ddp_ranks_see_the_single_process_rows(shard: Path) -> None:
    single = take(TokenLoader(shard, batch_size=6, seq_len=T, seed=3), 50)
    ranks = [take(TokenLoader(shard, batch_size=3, seq_len=T, seed=3, rank=r, world_size=2), 50) for r in range(2)]
    for k in range(50):
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]), single[k])
    # a run saved on 2 ranks resumes on 1 process with the same global batch
    two = TokenLoader(shard, batch_size=3, seq_len=T, seed=3, rank=1, world_size=2)
    take(two, 20)
    one = TokenLoader(shard, batch_size=6, seq_len=T, seed=3)
    one.load_state_dict(two.state_dict())
    assert torch.equal(next(one), single[20])


def test_eval_batches(shard: Path) -> None:
    loader = TokenLoader(shard, batch_size=4, seq_len=T)
    batches = list(loader.eval_batches())
    w = (N_TOKENS - 1) // T
    assert len(batches) == -(-w // 4)
    starts = torch.cat(batches)[:, 0]
    assert starts[:w].tolist() == list(range(0, w * T, T))  # fixed, contiguous, in order
    assert all(torch.equal(x, y) for x, y in zip(batches, loader.eval_batches()))  # deterministic
    take(loader, 3)
    assert torch.equal(next(iter(loader.eval_batches(1))), batches[0])  # training does not move it
    ranks = [list(TokenLoader(shard, batch_size=2, seq_len=T, rank=r, world_size=2).eval_batches(5)) for r in range(2)]
    assert all(torch.equal(torch.cat([ranks[0][k], ranks[1][k]]), batches[k]) for k in range(5))


def test_eval_batches_cover_every_window_when_the_batch_does_not_divide_them(shard: Path) -> None:
    """124 windows in batches of 5: the 25th batch holds the last 4 windows (and wraps one); none is left out."""
    w = (N_TOKENS - 1) // T
    assert w % 5
    starts = torch.cat(list(TokenLoader(shard, batch_size=5, seq_len=T).eval_batches()))[:, 0]
    assert len(starts) == 5 * -(-w // 5)
    assert set(starts.tolist()) == set(range(0, w * T, T))


def test_resume_exactly_at_the_end_of_an_epoch(shard: Path) -> None:
    """A loader saved after the last window of an epoch (pos == windows) resumes into the next epoch."""
    whole = TokenLoader(shard, batch_size=1, seq_len=T, seed=4)
    per_epoch = len(whole._epoch_starts)
    take(whole, per_epoch)
    state = whole.state_dict()
    assert state["epoch"] == 0 and state["pos"] == per_epoch  # the epoch is done, the next one not yet begun
    resumed = TokenLoader(shard, batch_size=1, seq_len=T, seed=4)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed), next(whole)) and resumed.epoch == 1


def small_data_dir(tmp_path: Path) -> Path:
    """A bytes DATA_DIR of four short documents."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document number {i} " * 20)
    data = tmp_path / "data"
    prepare(str(corpus), "bytes", data, val_fraction=0.3, progress=False)
    return data


def test_data_dir_and_errors(tmp_path: Path, shard: Path) -> None:
    data = small_data_dir(tmp_path)
    val = TokenLoader(data, "val", batch_size=2, seq_len=8)
    assert val.path == data / "val.bin" and next(val).shape == (2, 9)
    with pytest.raises(UserError, match="fewer than one window"):
        TokenLoader(data, "val", batch_size=2, seq_len=100_000)
    with pytest.raises(UserError, match="multitoken prepare"):
        TokenLoader(tmp_path / "missing", "train")
    with pytest.raises(UserError, match="unknown split"):
        TokenLoader(data, "test")
    loader = TokenLoader(shard, batch_size=2, seq_len=T)
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(shard, batch_size=2, seq_len=T + 1).load_state_dict(loader.state_dict())
    with pytest.raises(UserError, match="rank"):
        TokenLoader(shard, rank=2, world_size=2)


def test_damaged_data_dir_shard_is_refused_on_open(tmp_path: Path) -> None:
    data = small_data_dir(tmp_path)
    raw = bytearray((data / "train.bin").read_bytes())
    raw[32 + 2 * 50] ^= 0x01  # token 50 becomes another byte value: still inside the vocabulary
    (data / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"train\.bin is damaged: the checksum"):
        TokenLoader(data, "train", batch_size=2, seq_len=8)
    assert TokenLoader(data, "val", batch_size=2, seq_len=8).n_eval_windows > 0  # the other split is intact

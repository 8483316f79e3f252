"""TokenLoader: batches of token windows from a shard, deterministic, resumable, DDP-sliced.

Each batch is a LongTensor of shape (B, seq_len + 1): inputs are ``batch[:, :-1]``, and the
next-token and multi-token targets are all built later, by the loss, from the same window. So the
loader knows nothing of MTP (STYLE.md practice 4). A DATA_DIR with a loss mask per split (data the
model wrote itself, `multitoken distill-data`) gives (tokens, mask) pairs instead: the mask, bool
and aligned with the window, is False on tokens that are never targets (prompts, user turns).

Training order. The shard is cut into windows of seq_len + 1 tokens with stride seq_len (the
last token of a window is the first of the next), starting at a random phase in [0, seq_len).
Each epoch draws a new phase and shuffles the windows with a generator seeded by (seed, epoch),
so one epoch sees each token once, and the boundaries move between epochs. The windows form one
endless stream, epoch after epoch; global batch k is stream entries [kG, (k+1)G) with
G = batch_size * world_size, and rank r takes rows r*B .. (r+1)*B - 1 of it. Hence:

- N ranks with batch B see exactly the rows one process with batch N*B sees;
- the state is a position in the stream, the same on every rank, so `state_dict` /
  `load_state_dict` resume exactly, even across a change of world size at equal global batch.

Validation (`eval_batches`) uses fixed windows at 0, seq_len, 2*seq_len, ... in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.data.shards import read_shard
from multitoken.errors import UserError


class TokenLoader:
    """Endless training batches (``next(loader)``) and deterministic validation batches from one split."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        """Args:
            path: a DATA_DIR made by `multitoken prepare` (its ``{split}.bin`` is read) or a shard file.
            split: 'train' or 'val' (ignored when `path` is a shard file).
            batch_size: rows per batch on this rank (B).
            seq_len: tokens of input per row; rows hold seq_len + 1 tokens.
            seed: seeds the window order; equal on every rank.
            rank: this process's rank.
            world_size: number of processes sharing each global batch.
            vocab_size: every id must be below it; default, for a DATA_DIR, its tokenizer's (meta.json).
                The shard is checked once here (checksum and ids), so a damaged one is a one-line
                error naming the file and offset, not an IndexError in the embedding mid-run.
        """
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        p = Path(path)
        if p.is_dir():
            from multitoken.data.prepare import load_meta, shard_path  # prepare imports the tokenizer stack; keep it lazy

            meta = load_meta(p)
            if vocab_size is None:
                vocab_size = meta["vocab_size"]
            mask_name = meta["splits"].get(split, {}).get("mask")
            mask_path = p / mask_name if isinstance(mask_name, str) else None
            p = shard_path(p, split)
        else:
            mask_path = None
        self.path = p
        self.tokens = read_shard(p, vocab_size)  # memory-mapped (N,) uint16/uint32, verified
        # A loss mask (data the model wrote itself, `distill-data`): 1 where a token may be a target.
        self.mask = read_shard(mask_path, 2) if mask_path is not None else None
        if self.mask is not None and len(self.mask) != len(self.tokens):
            raise UserError(f"{mask_path} holds {len(self.mask)} entries for {len(self.tokens)} tokens in {p}: "
                            "write the DATA_DIR again (multitoken distill-data)")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        n = len(self.tokens)
        if n < seq_len + 1:
            raise UserError(f"{p} holds {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}: "
                            "lower --seq-len or prepare more data")
        self.epoch = 0
        self.pos = 0  # next stream entry within this epoch
        self._epoch_starts = self._starts(0)

    # ---- training -----------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Rows per step over all ranks (G)."""
        return self.batch_size * self.world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        """The next training batch, (B, seq_len + 1) int64."""
        starts = self._take(self.global_batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self._gather(mine)

    def _take(self, count: int) -> np.ndarray:
        """The next `count` window starts of the global stream, crossing epochs as needed."""
        parts = []
        while count > 0:
            if self.pos == len(self._epoch_starts):
                self.epoch += 1
                self.pos = 0
                self._epoch_starts = self._starts(self.epoch)
            k = min(count, len(self._epoch_starts) - self.pos)
            parts.append(self._epoch_starts[self.pos : self.pos + k])
            self.pos += k
            count -= k
        return np.concatenate(parts)

    def _starts(self, epoch: int) -> np.ndarray:
        """Shuffled window starts of one epoch: a random phase, then every seq_len tokens."""
        rng = np.random.default_rng([self.seed, epoch])
        n, t = len(self.tokens), self.seq_len
        phase = int(rng.integers(0, t)) if n - 1 - t >= t else 0  # a tiny shard keeps the one window it has
        count = max(1, (n - 1 - phase) // t)
        return phase + rng.permutation(count).astype(np.int64) * t

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (global, the same on every rank), plus what must match on resume."""
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one an uninterrupted loader would give."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("n_tokens", len(self.tokens))):
            if state[key] != mine:
                raise UserError(f"cannot resume the data loader: it was saved with {key}={state[key]}, this run has {mine}; "
                                "resume with the same data and settings")
        epoch, pos = state["epoch"], state["pos"]
        if not (isinstance(epoch, int) and isinstance(pos, int) and epoch >= 0 and pos >= 0):
            raise UserError(f"cannot resume the data loader: epoch {epoch!r} and position {pos!r} are not counts")
        starts = self._starts(epoch)
        if pos > len(starts):  # past the epoch's end: `_take` would never reach it (it used to spin forever)
            raise UserError(f"cannot resume the data loader: position {pos} is past the {len(starts)} windows of "
                            f"epoch {epoch}; the checkpoint's state.json is damaged")
        self.epoch, self.pos, self._epoch_starts = epoch, pos, starts

    # ---- validation ---------------------------------------------------------------------------

    @property
    def n_eval_windows(self) -> int:
        """Fixed validation windows the split holds."""
        return (len(self.tokens) - 1) // self.seq_len

    def eval_batches(self, n_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Deterministic batches of contiguous windows, sliced across ranks like training batches.

        Args:
            n_batches: batches to yield; None covers every window once (the last batch is filled
                by wrapping to the start). Windows repeat, in order, when more are asked for.
        Yields:
            (B, seq_len + 1) int64 tensors; every rank gets the same number.
        """
        g, w = self.global_batch_size, self.n_eval_windows
        if n_batches is None:
            n_batches = -(-w // g)
        for k in range(n_batches):
            idx = np.arange(k * g + self.rank * self.batch_size, k * g + (self.rank + 1) * self.batch_size) % w
            yield self._gather(idx * self.seq_len)

    # ---- shared -------------------------------------------------------------------------------

    def _gather(self, starts: np.ndarray):
        """(B, T+1) int64 windows; with a loss mask, the pair (windows, (B, T+1) bool mask)."""
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        tokens = torch.from_numpy(self.tokens[idx].astype(np.int64))
        if self.mask is None:
            return tokens
        return tokens, torch.from_numpy(self.mask[idx] != 0)

    def __repr__(self) -> str:
        return (f"TokenLoader({self.path}, tokens={len(self.tokens)}, B={self.batch_size}, T={self.seq_len}, "
                f"rank={self.rank}/{self.world_size}, epoch={self.epoch})")

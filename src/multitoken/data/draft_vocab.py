"""The draft vocabulary: the V' most frequent tokens of a DATA_DIR's training split.

Drafting over a frequency-ranked subset of the vocabulary (EAGLE-3 drafts over 32k of 128k
tokens; FR-Spec) multiplies only |V'| rows of the LM head per draft, while verification keeps the
whole vocabulary, so the output is unchanged (docs/decoding.md proves it for sampling too). The
subset is chosen once from token counts of the training data: a token that is rare there is
rarely the right draft. ``multitoken draft-vocab --data DATA_DIR --size N --heads-file FILE``
stores it in a heads file (io/heads_file.py), as EAGLE-3's ``d2t``/``t2d`` maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from multitoken.errors import UserError

CHUNK = 1 << 24
"""Tokens counted at a time (bounds the memory of one bincount pass)."""


def count_tokens(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """How often each token id occurs in DATA_DIR's `split` shard: (vocab_size,) int64."""
    from multitoken.data.prepare import load_meta, shard_path  # the tokenizer stack: keep it lazy
    from multitoken.data.shards import read_shard

    vocab = int(load_meta(data_dir)["vocab_size"])
    tokens = read_shard(shard_path(Path(data_dir), split), vocab)  # memory-mapped, verified
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(tokens), CHUNK):
        counts += np.bincount(np.asarray(tokens[i : i + CHUNK], dtype=np.int64), minlength=vocab)[:vocab]
    return counts


def frequent_tokens(counts: np.ndarray | Tensor, size: int, always: Iterable[int] = ()) -> Tensor:
    """The `size` most frequent token ids (ties: the lower id first), sorted ascending.

    Args:
        counts: (V,) occurrences per token id.
        size: |V'|, from 1 to V.
        always: ids kept whatever their count (e.g. EOS, so that a draft can end a reply).
    Returns:
        (size,) int64 ids.
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    V = counts.numel()
    always = sorted({int(t) for t in always})
    if not 1 <= size <= V:
        raise UserError(f"draft vocabulary of {size} tokens: choose a size from 1 to the vocabulary's {V}")
    if any(not 0 <= t < V for t in always) or len(always) > size:
        raise UserError(f"tokens {always} cannot all be kept in a draft vocabulary of {size} of {V} tokens: raise --size")
    # Rank by count, then by id (stable sort over ids in order): a deterministic choice.
    score = counts.clone()
    score[always] = float("inf")
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values


def draft_vocab_from_data(data_dir: str | Path, size: int, always: Iterable[int] = ()) -> Tensor:
    """`frequent_tokens` over the counts of DATA_DIR's training split (see `count_tokens`)."""
    return frequent_tokens(count_tokens(data_dir), size, always)

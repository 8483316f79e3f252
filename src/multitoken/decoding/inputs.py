"""What `generate` accepts from Python callers, checked before any tensor work.

A prompt is one list of token ids, a list of such lists (ragged), or a 1-D or 2-D integer
tensor; ids are plain or numpy integers inside the model's vocabulary. `draft` is a whole
number, `seed` a whole number a torch generator takes, `eos_id` an id of the vocabulary. Each
mistake is a one-line `UserError` (`BadValue` for a named setting) naming the value, where torch
would raise an IndexError deep in the embedding, accept a float tensor silently, or overflow.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from multitoken.errors import BadValue, UserError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a uint64


def _is_int(x: Any) -> bool:
    """A plain or numpy integer; not a bool (True is an int to Python, never a token id)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def prompt_rows(prompt_ids: Any, vocab_size: int | None = None) -> list[list[int]]:
    """The prompts as lists of ints, one per row.

    Args:
        prompt_ids: a list of ids, a list of lists of ids, or a 1-D / 2-D integer tensor.
        vocab_size: ids must be below it (None: not checked).
    Returns:
        One list of plain ints per row.
    """
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dtype == torch.bool or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise UserError(f"prompt_ids is a {prompt_ids.dtype} tensor: token ids are integers (use torch.long)")
        if prompt_ids.dim() not in (1, 2):
            raise UserError(f"prompt_ids has {prompt_ids.dim()} dimension(s): give (T,) ids or a (B, T) batch")
        rows = [prompt_ids.tolist()] if prompt_ids.dim() == 1 else prompt_ids.tolist()
    elif isinstance(prompt_ids, (list, tuple)):
        rows = list(prompt_ids)
        if rows and all(_is_int(t) for t in rows):
            rows = [rows]
        elif not all(isinstance(r, (list, tuple)) and all(_is_int(t) for t in r) for r in rows):
            bad = next(r for r in rows if not (isinstance(r, (list, tuple)) and all(_is_int(t) for t in r)))
            raise UserError(f"prompt_ids holds {str(bad)[:40]!r}: give a list of token ids (ints) or a list of such lists")
        rows = [[int(t) for t in r] for r in rows]
    else:
        raise UserError(f"prompt_ids is a {type(prompt_ids).__name__}: give a list of token ids, a list of lists, "
                        f"or a (B, T) integer tensor")
    if vocab_size is not None:
        for r in rows:
            bad = [t for t in r if not 0 <= t < vocab_size]
            if bad:
                raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab_size} "
                                f"(ids 0..{vocab_size - 1}): encode the prompt with the model's tokenizer")
    return rows


def check_decode_options(vocab_size: int, draft: Any, seed: Any, eos_id: Any) -> None:
    """Refuse a `draft`, `seed` or `eos_id` (one id or a list) of the wrong kind or out of range (None passes)."""
    if draft is not None and not _is_int(draft):
        raise BadValue("draft", repr(draft), "must be a whole number of drafted tokens")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= SEED_MAX):
        raise BadValue("seed", repr(seed), "must be a whole number between 0 and 2**64-1")
    ids = [] if eos_id is None else list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id]
    if not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise BadValue("eos_id", repr(eos_id), f"must be token ids of the vocabulary (0..{vocab_size - 1}), or None")

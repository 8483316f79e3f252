"""What a trained model is worth besides its loss: bits per byte and next-line exact match.

Both read the validation split of a DATA_DIR, which `prepare` fills with whole documents (whole
files, for a folder of .py files), so neither the tokenizer nor the training ever saw them.

**Bits per byte** compares models whose tokenizers differ (BPE and bytes):

    bpb = (sum of the main head's cross-entropy over the scored targets, in nats) / ln 2
          / (UTF-8 bytes of those same targets)

The windows are the validation split cut every seq_len tokens (`val_windows`), as training
evaluates them. A target is scored where the main head's loss scores it (`loss.shift_targets`:
never across a document boundary, so the first token of each document is not) and where it
stands for text: EOS and other special tokens are left out of both sums. Each target's bytes
come from `Tokenizer.token_byte_lengths` (byte-level pieces map back to their raw bytes), so the
byte count is the true UTF-8 length of the decoded scored tokens, not a count of characters or
of the byte alphabet's printable stand-ins.

**Next-line exact match** (greedy): a case is a line j >= 1 of a held-out file whose stripped
text is not empty and which has at most `MAX_LINE_CHARS` characters. The prompt is the file's
text up to the end of line j-1, without its newline (so the prompt tokenizes as the file does),
cut to its last `context` tokens. The model decodes greedily (plain next-token decoding) for at
most len(tokens of "\\n" + line + "\\n") + `EXTRA_TOKENS` tokens; the case is a hit when the
decoded text starts with "\\n", then holds line j exactly (indentation included), then ends
the line (a newline, EOS, or nothing left to decode because the file ends there). Cases are
taken from all eligible lines of all held-out files in file order at evenly spaced indices
(`next_line_cases`), fixed by the data alone: the same cases for every model of a DATA_DIR.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.training.loss import IGNORE_INDEX, shift_targets

MAX_LINE_CHARS = 160
EXTRA_TOKENS = 8


# ---- bits per byte ------------------------------------------------------------------------------


def val_windows(data_dir: str | Path, seq_len: int, max_windows: int = 0) -> np.ndarray:
    """Starts of the validation windows (seq_len + 1 tokens each, stride seq_len): all of them,
    or `max_windows` evenly spaced over the split when it holds more."""
    from multitoken.data.loader import TokenLoader

    n = TokenLoader(data_dir, "val", batch_size=1, seq_len=seq_len).n_eval_windows
    idx = np.arange(n) if not max_windows or max_windows >= n else np.linspace(0, n - 1, max_windows).round().astype(np.int64)
    return idx * seq_len


@torch.no_grad()
def main_head_nats(model, window: Tensor, eos_id: int | None) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the main head at every position of `window[:, :-1]`.

    Returns:
        (nats (B, T) float64, 0 where not scored; targets (B, T) long, IGNORE_INDEX where not scored).
    """
    hidden = model(window[:, :-1])[0]  # (B, T, C)
    targets = shift_targets(window, 0, eos_id)  # (B, T)
    w = model.unembed_weight(0)
    logits = (hidden.flatten(0, 1) @ w.to(hidden.dtype).t()).float()  # (B*T, V)
    nats = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return nats.view_as(targets).double(), targets


def bits_per_byte(nats: Tensor, targets: Tensor, token_bytes: Tensor) -> dict[str, float]:
    """Sums for bits per byte over scored targets (see the module docstring).

    Args:
        nats: (...) cross-entropy per position; targets: (...) ids or IGNORE_INDEX;
        token_bytes: (V,) bytes each id stands for (0 for special tokens).
    Returns:
        {"nats", "bytes", "tokens", "bits_per_byte"}: sums over the scored targets and their ratio.
    """
    valid = targets != IGNORE_INDEX
    nbytes = torch.where(valid, token_bytes.to(targets.device)[targets.clamp(min=0)], 0)
    scored = valid & (nbytes > 0)
    total_nats = float(nats[scored].sum())
    total_bytes = int(nbytes[scored].sum())
    return {"nats": total_nats, "bytes": total_bytes, "tokens": int(scored.sum()),
            "bits_per_byte": total_nats / math.log(2) / total_bytes if total_bytes else float("nan")}


def score_bits_per_byte(model, tokens: np.ndarray, starts: np.ndarray, seq_len: int, token_bytes: list[int],
                        eos_id: int | None, batch_size: int, device: torch.device,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """`bits_per_byte` of `model` over the windows at `starts` of the token array `tokens`."""
    tb = torch.tensor(token_bytes, dtype=torch.long, device=device)
    sums = {"nats": 0.0, "bytes": 0, "tokens": 0}
    for s in range(0, len(starts), batch_size):
        idx = starts[s : s + batch_size, None] + np.arange(seq_len + 1)
        window = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        with autocast():
            nats, targets = main_head_nats(model, window, eos_id)
        part = bits_per_byte(nats, targets, tb)
        for k in sums:
            sums[k] += part[k]
    return {**sums, "bits_per_byte": sums["nats"] / math.log(2) / sums["bytes"] if sums["bytes"] else float("nan")}


# ---- next-line exact match ------------------------------------------------------------------------


@dataclass(frozen=True)
class LineCase:
    """One next-line completion: the file's text before line `line` (without the newline) and that line."""

    doc: int
    line: int
    prompt: str
    target: str


def held_out_token_docs(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The validation split's documents (EOS-separated, EOS left out, empty ones skipped), in split order."""
    ends = np.flatnonzero(tokens == eos_id)
    docs, start = [], 0
    for end in [*ends.tolist(), len(tokens)]:
        if end > start:
            docs.append(np.asarray(tokens[start:end]))
        start = end + 1
    return docs


def held_out_documents(tokens: np.ndarray, eos_id: int, decode: Callable[[list[int]], str]) -> list[str]:
    """The validation split's documents (EOS-separated), decoded to text, in split order."""
    return [decode(d.tolist()) for d in held_out_token_docs(tokens, eos_id)]


def next_line_cases(docs: Iterable[str], n: int, max_line_chars: int = MAX_LINE_CHARS) -> list[LineCase]:
    """`n` cases at evenly spaced indices over every eligible line of `docs` (all when fewer)."""
    eligible = []
    for d, text in enumerate(docs):
        lines = text.split("\n")
        for j in range(1, len(lines)):
            if lines[j].strip() and len(lines[j]) <= max_line_chars:
                eligible.append((d, j, lines))
    if n < len(eligible):
        eligible = [eligible[i * len(eligible) // n] for i in range(n)]
    return [LineCase(d, j, "\n".join(lines[:j]), lines[j]) for d, j, lines in eligible]


def is_exact_line(completion: str, target: str, ended: bool) -> bool:
    """Whether decoded text `completion` (after a prompt ending before a newline) is "\\n" + target
    + the end of the line; `ended` says decoding stopped at EOS (the file ended)."""
    if not completion.startswith("\n"):
        return False
    rest = completion[1:]
    if rest.startswith(target + "\n"):
        return True
    return ended and rest == target


@torch.no_grad()
def next_line_exact_match(model, tokenizer, cases: list[LineCase], context: int, batch_size: int = 16) -> dict[str, Any]:
    """Greedy next-line exact match of `model` over `cases` (see the module docstring).

    Returns:
        {"exact_match": share of hits (None without cases), "cases": n, "hits": count}.
    """
    from multitoken.decoding import generate

    eos = tokenizer.eos_id
    hits = 0
    for s in range(0, len(cases), batch_size):
        batch = cases[s : s + batch_size]
        caps = [len(tokenizer.encode("\n" + c.target + "\n")) + EXTRA_TOKENS for c in batch]
        cap = max(caps)
        keep = max(1, min(context, model.config.max_seq_len - cap - 1))
        prompts = [(tokenizer.encode(c.prompt) or [eos])[-keep:] for c in batch]
        out, _ = generate(model, prompts, max_new_tokens=cap, mode="ntp", eos_id=eos, compile=False, graphs=False)
        for c, ids, row_cap in zip(batch, out, caps):
            ids = ids[:row_cap]
            ended = eos in ids
            if ended:
                ids = ids[: ids.index(eos)]
            hits += is_exact_line(tokenizer.decode(ids), c.target, ended)
    return {"exact_match": hits / len(cases) if cases else None, "cases": len(cases), "hits": hits}

"""Sampling: one warping of logits into probabilities, and draws that take their randomness as input.

The lowest layer of decoding. `probs` applies temperature, top-k and top-p (the same warping
for target and draft distributions, which lossless verification needs). `draw` turns one
uniform number per row into a token by inverting the CDF, so a step's randomness is a small
(B, R) buffer filled outside the step: a compiled step replayed as a CUDA graph then samples
from the user's seeded generator without any random-number kernel of its own.

Settings are either one `Sampling` for every row or a `RowSampling`: per-row tensors that live
in the decode state, so a batch mixes greedy and sampled rows with different temperatures,
top-k and top-p in one compiled step (only whether any row samples, or filters, is structure).
A greedy row inside a sampling batch gets a one-hot distribution, under which lossless
verification accepts exactly the drafts equal to the argmax and emits the argmax: plain greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from multitoken.errors import BadValue


@dataclass(frozen=True)
class Sampling:
    """How a distribution is drawn from logits; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = all)."""

    def __post_init__(self) -> None:
        from multitoken.checks import SAMPLING_RANGES

        # Range checks fail NaN too (a NaN temperature once sampled token 0 forever).
        for name, rng in SAMPLING_RANGES.items():
            why = rng.problem(getattr(self, name))
            if why is not None:
                raise BadValue(name, repr(getattr(self, name)), why)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings per row, as (B,) tensors read in place (`DecodeState` owns them).

    Equality and hashing see only the structure (`greedy`, `filtered`), never the values: a
    strategy keyed on it serves any mix of settings with one compiled step.
    """

    greedy: bool
    """Every row is greedy (the strategy may take the argmax path and skip sampling)."""
    filtered: bool
    """Some row uses top-k or top-p (the sort runs only then)."""
    temperature: Tensor = field(compare=False, hash=False, repr=False)
    """(B,) temperature per row; 0 = greedy."""
    top_k: Tensor = field(compare=False, hash=False, repr=False)
    """(B,) long; 0 = all tokens."""
    top_p: Tensor = field(compare=False, hash=False, repr=False)
    """(B,); 1 = all tokens."""


def _row_probs(logits: Tensor, s: RowSampling) -> Tensor:
    """`probs` with per-row settings: logits (B, ..., V), settings (B,), broadcast over the middle dims."""
    B, V = logits.shape[0], logits.shape[-1]
    shape = (B,) + (1,) * (logits.dim() - 1)
    t = s.temperature.view(shape).float()
    greedy = t == 0
    z = logits / torch.where(greedy, 1.0, t)
    if s.filtered:
        sorted_z, order = z.sort(dim=-1, descending=True)
        k = torch.where(s.top_k > 0, s.top_k, V).clamp(max=V).view(shape)
        kth = sorted_z.gather(-1, (k - 1).expand(sorted_z.shape[:-1] + (1,)))
        z = z.masked_fill(z < kth, float("-inf"))
        sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))  # the same order as sorting z again
        sorted_p = sorted_z.softmax(-1)
        top_p = s.top_p.view(shape).float()
        drop = ((sorted_p.cumsum(-1) - sorted_p) >= top_p) & (top_p < 1.0)
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    return torch.where(greedy, one_hot, z.softmax(-1))


def probs(logits: Tensor, s: "Sampling | RowSampling") -> Tensor:
    """Probabilities (..., V) after temperature, top-k and top-p (float32); one-hot when greedy."""
    logits = logits.float()
    if isinstance(s, RowSampling):
        return _row_probs(logits, s)
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def draw(p: Tensor, u: Tensor) -> Tensor:
    """One token per row of (unnormalised) probabilities p (..., V), from uniforms u (...) in [0, 1).

    Inverse CDF: the first token whose cumulative mass exceeds u * total. A zero-probability
    token adds no mass, so it is never chosen; the target is kept strictly below the total so
    rounding cannot step past the last token that has mass.
    """
    cdf = p.float().cumsum(-1)
    total = cdf[..., -1:]
    target = torch.minimum(u[..., None].float() * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[..., 0].clamp(max=p.shape[-1] - 1)


def sample(logits: Tensor, s: "Sampling | RowSampling", u: Tensor | None = None) -> Tensor:
    """Tokens (...) from logits (..., V): argmax when greedy, else a draw from `probs` with uniforms u (...)."""
    if s.greedy:
        return logits.argmax(-1)
    return draw(probs(logits, s), u)

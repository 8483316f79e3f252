"""Sampling: one warping of logits into probabilities, and draws that take their randomness as input.

The lowest layer of decoding. `probs` applies temperature, top-k and top-p (the same warping
for target and draft distributions, which lossless verification needs). `draw` turns one
uniform number per row into a token by inverting the CDF, so a step's randomness is a small
(B, R) buffer filled outside the step: a compiled step replayed as a CUDA graph then samples
from the user's seeded generator without any random-number kernel of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def probs(logits: Tensor, s: Sampling) -> Tensor:
    """Probabilities (..., V) after temperature, top-k and top-p (float32); one-hot when greedy."""
    logits = logits.float()
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


def sample(logits: Tensor, s: Sampling, u: Tensor | None = None) -> Tensor:
    """Tokens (...) from logits (..., V): argmax when greedy, else a draw from `probs` with uniforms u (...)."""
    if s.greedy:
        return logits.argmax(-1)
    return draw(probs(logits, s), u)

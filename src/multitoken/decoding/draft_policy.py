"""The draft length: how many drafts k' (0 = a plain step) maximise tokens per second.

A pure function of what the loop has measured, so that it can be unit-tested on synthetic costs
and acceptance and wired into any decoding loop:
- step costs: seconds per step for each candidate k' (0 included), measured on this engine;
- acceptance so far, per draft position, kept per temperature (a draft that is right at
  temperature 0 is not the one sampled at temperature 1): `Acceptance`.

Expected tokens per step with k' drafts are ``1 + sum_{j<=k'} prod_{i<=j} alpha_i``, where alpha_i
is the acceptance of position i given that position i-1 was accepted (the chain stops at its
first rejection). alpha_i is the posterior mean under a Beta prior: at position 1 a uniform
prior; at a deeper position never tried, the prior is centred on the position before it
(acceptance rarely rises with depth), and the loop never drafts more than one position past the
deepest one it has tried, so it goes deeper one position at a time, while the positions it knows
say it would pay. Chosen: the k' with the most expected tokens per second,
``tokens(k') / cost(k')``, kept unless another beats it by `margin` (no flapping between
strategies, each of which may need a CUDA graph).

What exploration costs: with no measurements the policy drafts 1 token, whatever the costs (the
only forced exploration: until one check has measured position 1 no estimate means anything), and
after that check the measurements decide. Drafts that are never right are dropped as soon as
the optimistic estimate (posterior mean plus one standard deviation) says that even they cannot
beat plain decoding: plain steps measure nothing, so that decision is final, and a noisy first
check must not make it. With a draft costing 10% more than a plain step that takes about 18
row-steps of drafts that are never right, under two plain steps lost in all. Keep `Acceptance` across calls (per temperature) and it
is paid once per engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MARGIN = 0.01
"""Relative gain in expected tokens per second needed to switch away from the current length."""


@dataclass
class Acceptance:
    """Counts per draft position j = 1..K (index j-1): how often position j was tried (drafted, and
    position j-1 accepted) and how often it was then accepted."""

    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, k: int, row_steps: int, accepted_per_position: list[int]) -> None:
        """Count `row_steps` steps that drafted k tokens, where accepted_per_position[j-1] row-steps
        accepted position j (a chain's tally: n >= j)."""
        while len(self.tried) < k:
            self.tried.append(0)
            self.accepted.append(0)
        for j in range(k):
            self.tried[j] += row_steps if j == 0 else accepted_per_position[j - 1]
            self.accepted[j] += accepted_per_position[j]


def conditional_rates(acc: Acceptance, K: int, prior: float = 2.0, z: float = 0.0) -> list[float]:
    """Posterior means of alpha_1..alpha_K (see the module docstring), `prior` pseudo-counts; with
    z > 0, optimistic ones: mean + z posterior standard deviations (at most 1)."""
    rates, mean = [], 0.5
    for j in range(K):
        t = acc.tried[j] if j < len(acc.tried) else 0
        a = acc.accepted[j] if j < len(acc.accepted) else 0
        mean = (a + prior * mean) / (t + prior)
        rates.append(min(1.0, mean + z * (mean * (1 - mean) / (t + prior + 1)) ** 0.5))
    return rates


def expected_tokens(rates: list[float], k: int) -> float:
    """Tokens per step with k drafts: 1 + sum_{j<=k} prod_{i<=j} rates[i-1]."""
    total, run = 1.0, 1.0
    for r in rates[:k]:
        run *= r
        total += run
    return total


def choose_draft(costs: dict[int, float], acc: Acceptance, current: int | None = None,
                 margin: float = DEFAULT_MARGIN) -> int:
    """The draft length with the most expected tokens per second.

    Args:
        costs: measured seconds per step for each candidate k' (0 = plain); lengths without a
            positive cost are not candidates.
        acc: acceptance so far at this temperature.
        current: the length running now (kept unless another is `margin` better), or None.
    Returns:
        k' (the shortest among equals).
    """
    ks = sorted(k for k, c in costs.items() if c and c > 0)
    if not ks:
        raise ValueError("choose_draft needs at least one measured step cost")
    # Explore one position at a time: never draft deeper than one past the deepest position tried.
    known = next((j for j, t in enumerate(acc.tried) if t == 0), len(acc.tried))
    if known == 0 and 1 in ks:
        return 1  # the one forced exploration: without measured acceptance no estimate is worth more
    ks = [k for k in ks if k <= known + 1] or ks[:1]
    rates = conditional_rates(acc, max(ks))
    rate = {k: expected_tokens(rates, k) / costs[k] for k in ks}
    best = max(ks, key=lambda k: (rate[k], -k))
    if best == 0 and 0 in rate and len(ks) > 1:
        # Plain steps measure nothing, so giving drafts up is for good: only when even optimistic
        # estimates (one standard deviation up) say that no length beats plain decoding.
        hope = conditional_rates(acc, max(ks), z=1.0)
        drafting = max((k for k in ks if k), key=lambda k: expected_tokens(hope, k) / costs[k])
        if expected_tokens(hope, drafting) / costs[drafting] > rate[0]:
            best = max((k for k in ks if k), key=lambda k: (rate[k], -k))
    if current in rate and rate[best] <= rate[current] * (1 + margin):
        return current
    return best

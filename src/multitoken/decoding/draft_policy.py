"""The draft length: how many drafts k' (0 = a plain step) maximise tokens per second.

Pure host-side logic over what the loop has measured, so that it can be unit-tested on synthetic
costs and acceptance (tests/test_draft_policy.py simulates whole runs) and wired into any loop:
- step costs: seconds per step for each candidate k' (0 included), measured on this engine;
- acceptance so far, per draft position, from the steps that drafted that position: `Acceptance`
  (fed from the tally's histogram of accepted drafts per draft length, so steps of different
  lengths never dilute each other's statistics).

Expected tokens per step with k' drafts are ``1 + sum_{j<=k'} prod_{i<=j} alpha_i``, where alpha_i
is the acceptance of position i given that position i-1 was accepted (the chain stops at its
first rejection). alpha_i is the posterior mean under a Beta prior: at position 1 a uniform
prior; at a deeper position never tried, the prior is centred on the position before it
(acceptance rarely rises with depth), and the loop never drafts more than one position past the
deepest one it has tried, so it goes deeper one position at a time, while the positions it knows
say it would pay. Chosen: the k' with the most expected tokens per second,
``tokens(k') / cost(k')``, kept unless another beats it by `margin` (no flapping between
strategies, each of which may need a CUDA graph).

What exploration costs, and why plain steps are not for good (`DraftPolicy`):
- with no measurements the policy drafts 1 token (until one check has measured position 1 no
  estimate means anything); the loop itself starts from the full draft, which measures every
  position at once;
- drafts are given up for plain steps only when even an optimistic estimate (posterior mean
  plus one standard deviation) cannot beat plain decoding, so a noisy first check does not;
- plain steps measure nothing, so the policy probes: after `probe_after` plain steps it drafts
  one token for one check, and each probe that ends straight back in plain steps doubles the
  wait. A probe costs at most one check of one-draft steps (8 steps of (cost(1) - cost(0))
  each, about 1.5 plain steps at the H100's measured costs); with the wait doubling, n steps
  hold at most log2(n / probe_after) of them, so drafts that are never right cost under 1% of
  plain speed, while acceptance that recovers (prose, then code) is found again;
- counts decay with a half-life of `half_life` steps, so what a probe measures is not drowned by
  what the text was like long ago.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MARGIN = 0.01
"""Relative gain in expected tokens per second needed to switch away from the current length."""
PROBE_AFTER = 128
"""Plain steps before the first probe (then twice as many after each probe that failed)."""
HALF_LIFE = 512
"""Steps after which a measurement counts half (the acceptance of a text drifts)."""
PROBE_MEMORY = 24.0
"""At a probe, earlier counts are scaled down to this many tries of position 1 (one check of a row)."""


@dataclass
class Acceptance:
    """Counts per draft position j = 1..K (index j-1): how often position j was tried (drafted, and
    position j-1 accepted) and how often it was then accepted. Floats: old counts decay."""

    tried: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def _grow(self, k: int) -> None:
        while len(self.tried) < k:
            self.tried.append(0)
            self.accepted.append(0)

    def add(self, k: int, row_steps: int, accepted_per_position: Sequence[int]) -> None:
        """Count `row_steps` steps that drafted k tokens, where accepted_per_position[j-1] row-steps
        accepted position j (a chain's tally: n >= j)."""
        self._grow(k)
        for j in range(k):
            self.tried[j] += row_steps if j == 0 else accepted_per_position[j - 1]
            self.accepted[j] += accepted_per_position[j]

    def add_histogram(self, hist: Sequence[Sequence[int]]) -> None:
        """Count steps from a histogram hist[k][n]: steps that drafted k tokens and accepted n."""
        for k, row in enumerate(hist):
            for n, c in enumerate(row):
                if c and k:
                    self._grow(k)
                    for j in range(1, k + 1):
                        self.tried[j - 1] += c if n >= j - 1 else 0
                        self.accepted[j - 1] += c if n >= j else 0

    def scale(self, f: float) -> None:
        """Multiply every count by f (forgetting)."""
        self.tried = [t * f for t in self.tried]
        self.accepted = [a * f for a in self.accepted]


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
    known = next((j for j, t in enumerate(acc.tried) if t <= 0), len(acc.tried))
    if known == 0 and 1 in ks:
        return 1  # the one forced exploration: without measured acceptance no estimate is worth more
    ks = [k for k in ks if k <= known + 1] or ks[:1]
    rates = conditional_rates(acc, max(ks))
    rate = {k: expected_tokens(rates, k) / costs[k] for k in ks}
    best = max(ks, key=lambda k: (rate[k], -k))
    if best == 0 and 0 in rate and len(ks) > 1:
        # Giving drafts up only when even optimistic estimates (one standard deviation up) say
        # that no length beats plain decoding: a noisy check must not end drafting.
        hope = conditional_rates(acc, max(ks), z=1.0)
        drafting = max((k for k in ks if k), key=lambda k: expected_tokens(hope, k) / costs[k])
        if expected_tokens(hope, drafting) / costs[drafting] > rate[0]:
            best = max((k for k in ks if k), key=lambda k: (rate[k], -k))
    if current in rate and rate[best] <= rate[current] * (1 + margin):
        return current
    return best


class DraftPolicy:
    """The draft-length choice of one generation: acceptance measured so far, forgetting, and
    probes out of plain steps (see the module docstring).

    The loop calls `observe` at every host check with what the steps since the last one did,
    and `choose` when it may switch.

    Args:
        K: the longest draft.
        resumable: whether drafting can resume after plain steps with drafts as good as before
            (False: plain steps are final, as for heads whose caches plain steps do not keep).
        probe_after, half_life, margin: see the module constants.
    """

    def __init__(self, K: int, resumable: bool = True, probe_after: int = PROBE_AFTER, half_life: float = HALF_LIFE,
                 margin: float = DEFAULT_MARGIN, probe_memory: float = PROBE_MEMORY) -> None:
        self.K, self.resumable, self.margin = K, resumable, margin
        self.probe_after, self.half_life, self.probe_memory = probe_after, half_life, probe_memory
        self.acc = Acceptance()
        self.failed = 0
        """Probes in a row that went straight back to plain steps."""
        self.plain_steps = 0
        """Steps since drafting stopped (while plain)."""
        self.probing = False
        self.probes = 0
        """Probes made (for reports and tests)."""
        self.current: int | None = None
        """The length last chosen (a later generation on the same engine starts from it)."""

    def observe(self, hist: Sequence[Sequence[int]], steps: int) -> None:
        """Count `steps` loop steps whose row-steps are hist[k][n] (k drafts, n accepted)."""
        if steps <= 0:
            return
        self.acc.scale(0.5 ** (steps / self.half_life))
        self.acc.add_histogram(hist)
        if all(c == 0 for row in hist[1:] for c in row):
            self.plain_steps += steps

    def probe_due(self) -> bool:
        """Whether plain steps have run long enough for the next probe."""
        return self.resumable and self.plain_steps >= self.probe_after << min(self.failed, 30)

    def steps_to_probe(self) -> int | None:
        """Plain steps left until the next probe (None: never)."""
        if not self.resumable:
            return None
        return max(0, (self.probe_after << min(self.failed, 30)) - self.plain_steps)

    def choose(self, costs: dict[int, float], current: int) -> int:
        """The length to run from now (`choose_draft` while drafting; probes while plain)."""
        self.current = self._choose(costs, current)
        return self.current

    def _choose(self, costs: dict[int, float], current: int) -> int:
        if current == 0:
            if not self.probe_due():
                return 0
            self.probing, self.probes = True, self.probes + 1
            self.plain_steps = 0
            # What made the loop stop drafting weighs no more than a probe's own check: acceptance
            # that has recovered must be able to show it in one probe.
            if self.acc.tried and self.acc.tried[0] > self.probe_memory:
                self.acc.scale(self.probe_memory / self.acc.tried[0])
            return 1 if 1 in costs else current
        new = choose_draft({k: c for k, c in costs.items() if k <= self.K}, self.acc, current, self.margin)
        if new == 0:
            self.failed = self.failed + 1 if self.probing else 0
            self.plain_steps = 0
        self.probing = False
        return new


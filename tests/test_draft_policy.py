"""The draft-length policy against synthetic step costs and acceptance: a simulated decoding run
(chains whose position j is accepted with probability alpha_j once j-1 was) chooses its length at
every check as the loop would; it must never fall below plain decoding and must stay within 5%
of the best fixed length, which is computed here by brute force over every fixed length."""

from __future__ import annotations

import random

import pytest

from multitoken.decoding.draft_policy import Acceptance, choose_draft, conditional_rates, expected_tokens


def simulate(alpha: list[float], costs: dict[int, float], policy, tokens: int = 512, rows: int = 1, check: int = 8,
             seed: int = 0) -> float:
    """Tokens per second of one run: `policy(acc, current)` picks k at each check (every `check` steps)."""
    rng = random.Random(seed)
    acc, k, made, time = Acceptance(), None, 0, 0.0
    while made < tokens * rows:
        k = policy(acc, k)
        acc_pos = [0] * k
        for _ in range(check):
            for _ in range(rows):
                n = 0
                while n < k and rng.random() < alpha[n]:
                    n += 1
                for j in range(n):
                    acc_pos[j] += 1
                made += n + 1
            time += costs[k]
        if k:
            acc.add(k, check * rows, acc_pos)
    return made / time


def fixed(k):
    return lambda acc, current: k


CASES = {  # name: (conditional acceptance per position, cost per step of k drafts)
    "good drafts, cheap": ([0.9, 0.85, 0.8, 0.75], {k: 1 + 0.1 * k for k in range(5)}),
    "useless drafts": ([0.0, 0.0, 0.0, 0.0], {k: 1 + 0.1 * k for k in range(5)}),
    "first draft only": ([0.8, 0.15, 0.05, 0.0], {k: 1 + 0.12 * k for k in range(5)}),
    "temperature 1, dear drafts": ([0.45, 0.4, 0.35, 0.3], {0: 1.0, 1: 1.3, 2: 1.55, 3: 1.8, 4: 2.05}),
    "barely worth it": ([0.2, 0.1, 0.1, 0.1], {k: 1 + 0.15 * k for k in range(5)}),
    "H200 chain of 4 (issue 23)": ([0.8, 0.7, 0.6, 0.55], {0: 1.0, 1: 1.37, 2: 1.45, 3: 1.55, 4: 1.64}),
    "batch 16, dear verification": ([0.7, 0.6, 0.5, 0.4], {0: 1.0, 1: 1.6, 2: 2.1, 3: 2.6, 4: 3.1}),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rows", [1, 16])
def test_the_policy_never_loses_to_plain_and_is_within_5_percent_of_the_best_fixed_length(name, rows):
    alpha, costs = CASES[name]
    policy = lambda acc, current: choose_draft(costs, acc, current)  # noqa: E731
    for seed in range(3):
        ours = simulate(alpha, costs, policy, rows=rows, seed=seed)
        by_k = {k: simulate(alpha, costs, fixed(k), rows=rows, seed=seed) for k in costs}
        best = max(by_k.values())
        # Exploration: at most ~9 one-draft steps of 1.1-1.3x a plain step, in 512 tokens per row.
        assert ours >= by_k[0] * 0.99, (name, seed, ours, by_k)
        assert ours >= 0.95 * best, (name, seed, ours, by_k)


def test_expected_tokens_and_rates_by_hand():
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    acc = Acceptance()
    acc.add(2, 10, [8, 4])  # position 1: 8 of 10; position 2: 4 of the 8 that reached it
    acc.add(1, 10, [5])
    assert acc.tried == [20, 8] and acc.accepted == [13, 4]
    r = conditional_rates(acc, 3, prior=2.0)
    assert r[0] == pytest.approx((13 + 1) / 22) and r[1] == pytest.approx((4 + 2 * r[0]) / 10) and r[2] == pytest.approx(r[1])


def test_exploration_goes_one_position_deeper_at_a_time_and_sticks():
    costs = {k: 1 + 0.1 * k for k in range(5)}
    assert choose_draft(costs, Acceptance()) == 1  # nothing measured: one draft
    acc = Acceptance()
    acc.add(1, 100, [95])
    assert choose_draft(costs, acc) == 2  # position 2 not tried yet: only one deeper
    acc.add(2, 100, [95, 90])
    assert choose_draft(costs, acc) == 3
    near = {0: 1.0, 1: 1.0, 2: 1.0}
    flat = Acceptance([100, 50], [50, 0])  # position 2 never passed: k=2 expects 0.6% more than k=1
    assert choose_draft(near, flat) == 2 and choose_draft(near, flat, current=1) == 1  # within the 1% margin: stay
    assert choose_draft({0: 1.0, 1: 1.0, 2: 0.95}, flat, current=1) == 2  # 6% better: switch

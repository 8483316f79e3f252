"""Sampled draft trees: candidates drawn from q without replacement and recursive rejection sampling
over each node's children give exactly the target's law, checked against a synthetic target whose
joint law is written down (large batches of pure tensor calls, chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from multitoken.decoding.sampling import Sampling
from multitoken.decoding.trees import DynamicTree, StaticTree, build_sampled_nodes, sample_candidates
from multitoken.decoding.verify import verify_tree_sampling

V = 6
ROWS = 200_000


def test_candidates_are_drawn_without_replacement_with_the_right_law():
    """First draw ~ q; second draw ~ q without the first (normalised); past the support: not valid."""
    q = torch.tensor([[[0.5, 0.3, 0.2, 0.0, 0.0, 0.0]]]).expand(ROWS, 1, V)
    g = torch.Generator().manual_seed(0)
    cand, valid = sample_candidates(q, torch.rand(ROWS, 1, 4, generator=g))
    assert valid[:, 0, :3].all() and not valid[:, 0, 3].any()
    assert (cand[:, 0, 0] != cand[:, 0, 1]).all() and (cand[:, 0, 1] != cand[:, 0, 2]).all()
    pair = cand[:, 0, 0] * V + cand[:, 0, 1]
    want = torch.zeros(V * V, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            if a != b:
                want[a * V + b] = q[0, 0, a] * q[0, 0, b] / (1 - q[0, 0, a])
    obs = torch.bincount(pair, minlength=V * V).double()
    keep = want > 0
    assert float(obs[~keep].sum()) == 0
    assert chisquare(obs[keep].numpy(), (want[keep] / want.sum() * ROWS).numpy()).pvalue > 1e-4


def synthetic(seed: int):
    """A target over two tokens: p1 at the root, p2[t1] after t1; drafts q1, q2 that differ from them."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    q[1, 0] = 0.0  # a token the drafter never proposes (as outside a reduced vocabulary)
    q[1] /= q[1].sum()
    return p1, p2, q


def run_tree(tree, p1, p2, q, g):
    """One verification per row; returns (t1, t2) per row: the first two emitted tokens (a second plain
    step from p2 when the step emitted only one)."""
    B = ROWS
    qb = q.expand(B, 2, V)
    R = tree.ranks if isinstance(tree, StaticTree) else tree.width
    cand, valid = sample_candidates(qb, torch.rand(B, 2, R, generator=g))
    lq = qb.clamp(min=1e-9).log()  # the shape of a dynamic tree comes from q's confidence
    tokens, parent, depth, rank = build_sampled_nodes(tree, torch.zeros(B, dtype=torch.long), lq, cand)
    # Node logits: the target after the node's path (depth 0: p1; depth 1: p2[token]; depth 2: anything).
    logits = torch.where((depth == 0)[..., None], p1.log(), p2[tokens].log())
    logits = torch.where((depth == 2)[..., None], torch.zeros(V), logits)
    s = Sampling(temperature=1.0)
    best, n, final = verify_tree_sampling(logits, parent, rank, 2, qb, cand, valid, s,
                                          torch.rand(B, 2 * 2 * R, generator=g), torch.rand(B, generator=g))
    path_tok = lambda d: tokens.gather(1, torch.where(depth.gather(1, best[:, None])[:, 0] == d, best, parent.gather(1, best[:, None])[:, 0])[:, None])[:, 0]  # noqa: E731
    t1 = torch.where(n == 0, final, path_tok(1))
    second = torch.multinomial(p2[t1], 1, generator=g)[:, 0]  # the next plain step after a one-token step
    t2 = torch.where(n == 0, second, torch.where(n == 1, final, tokens.gather(1, best[:, None])[:, 0]))
    return t1, t2, n


@pytest.mark.parametrize("tree", [StaticTree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 1)]),
                                  StaticTree([(0,), (2,), (0, 1), (2, 0), (2, 2)]),  # ranks with gaps
                                  DynamicTree(8, 2, 4)])
def test_recursive_rejection_over_sampled_children_has_the_exact_joint_law(tree):
    """Catches (planted): Q not losing the earlier draws, the residual not updated after a rejection,
    and a skipped rank (not a child) treated as a rejection."""
    for seed in range(2):
        p1, p2, q = synthetic(seed)
        g = torch.Generator().manual_seed(100 + seed)
        t1, t2, n = run_tree(tree, p1, p2, q, g)
        assert (n == 0).any() and (n == 1).any() and (n == 2).any()
        want = (p1[:, None] * p2).flatten().double()
        obs = torch.bincount(t1 * V + t2, minlength=V * V).double()
        assert chisquare(obs.numpy(), (want / want.sum() * ROWS).numpy()).pvalue > 1e-4, (tree, seed)

"""Speculative decoding against naive references, through the public `generate` API only.

Every reference here is computed from the model's own no-cache forward (``model(idx)`` ->
``[main, d1..dD]`` normed hidden states, ``model.logits(h, depth)``), never from the decoding
code, and nothing in the decoding package is patched: these tests pin behaviour, not
internals, so they survive a rewrite of the decoding engine.

- Sampling: the joint distribution of the first m generated tokens (bonus tokens included) is
  enumerated exactly from full forward passes and compared with a large batch of identical
  prompts (rows are independent samples) by a chi-square test, for chain and tree decoding and
  every head family, with random heads (drafts and target differ) at temperature 0.7.
- Draft plumbing: at temperature 0 the drafts a correct engine makes at each step are fixed by
  the accepted prefix (depth k at the last accepted position predicts the token k+1 ahead), so
  tau and the acceptance per position that `generate` reports must equal a replay done here.
- Lossy typical acceptance: the same replay with Medusa's rule p(d) > min(eps, delta*exp(-H(p))).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from conftest import FAMILIES, FUSED, SHARED, tiny_model
from multitoken.decoding.api import generate
from multitoken.decoding.trees import StaticTree

V = 8  # tiny vocabulary: the joint of 4 tokens has 4096 cells, enumerable in one batched pass per token
PROMPT = [3, 5, 2]


def random_model(kind: str, depth: int, seed: int, head_std: float = 0.1, **overrides):
    """A tiny model with every matrix random: heads draft from their own hidden states, so q != p.

    The unembeddings get a smaller scale so that target and drafts overlap (acceptance ~0.1-0.8),
    which exercises accepted, rejected and fully accepted steps alike.
    """
    model = tiny_model(kind, depth, seed=seed, **{"vocab_size": V, "max_seq_len": 32, "tie_embeddings": False, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (head_std if "lm_head" in name else 0.3))
    return model


# ---- naive references ----------------------------------------------------------------------------------
def warp(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Target distribution (n, V) in float64: temperature, then top-k, then the smallest top set
    whose mass reaches top_p (renormalised), written out token by token."""
    p = (logits.double() / temperature).softmax(-1)
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        mass = 0.0
        order = p[i].argsort(descending=True).tolist()
        kept = order[:top_k] if top_k else order
        total = float(p[i, kept].sum())
        for j in kept:
            out[i, j] = p[i, j] / total
            mass += float(out[i, j])
            if mass >= top_p:
                break
    return out / out.sum(-1, keepdim=True)


@torch.no_grad()
def exact_joint(model, prompt: list[int], m: int, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """P(t_1..t_m | prompt) for all V^m sequences (index = the tokens as a base-V number)."""
    seqs = torch.tensor([prompt])
    joint = torch.ones(1, dtype=torch.float64)
    for _ in range(m):
        p = warp(model.logits(model(seqs)[0][:, -1]), temperature, top_k, top_p)  # (n, V) no cache
        joint = (joint[:, None] * p).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return joint


def chi2_pvalue(out: list[list[int]], joint, min_expected: float = 10.0) -> float:
    """Pearson chi-square of observed sequences against `joint`; cells expected below
    `min_expected` are pooled into one, so that the chi-square approximation holds."""
    t = torch.tensor(out)
    cell = torch.zeros(t.shape[0], dtype=torch.long)
    for j in range(t.shape[1]):
        cell = cell * V + t[:, j]
    obs = torch.bincount(cell, minlength=joint.numel()).double()
    exp = joint * t.shape[0]
    assert float(obs[exp == 0].sum()) == 0, "a sequence of probability 0 was generated"
    small = exp < min_expected
    o = torch.cat([obs[~small], obs[small].sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = e > 0
    return float(chisquare(o[keep].numpy(), e[keep].numpy()).pvalue)


# ---- sampling is exact: first m tokens, bonus tokens included -------------------------------------------
ALPHA = 1e-4
"""Per-test false-failure rate. There are 21 chi-square tests below (3 families x 3 seeds for chains,
3 x 2 for trees, 2 x 3 with top-k/top-p), so a correct engine under fresh seeds fails one of them
with probability at most 21e-4 (Bonferroni). The seeds are fixed, so a run is deterministic."""
ROWS = 6000  # ~1 s per decode of 4 tokens on one thread
M = 4  # prefill token + a step of two drafts + the bonus after them


def assert_exact(kind: str, seed: int, mode: str, tree=None, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 1.0, draft: int | None = 2) -> None:
    model = random_model(kind, 2, seed)
    joint = exact_joint(model, PROMPT, M, temperature, top_k, top_p)
    out, stats = generate(model, [PROMPT] * ROWS, M, mode=mode, draft=draft, tree=tree, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=1000 + seed)
    assert all(len(o) == M for o in out)
    # Not a degenerate case: drafts are rejected often and fully accepted often.
    assert 0.01 < stats.acceptance_per_position[-1] and stats.acceptance_per_position[0] < 0.95
    p = chi2_pvalue(out, joint)
    assert p > ALPHA, (kind, mode, seed, p)


@pytest.mark.parametrize("kind", FAMILIES)
def test_chain_sampling_has_the_exact_joint_distribution(kind):
    """Chain decoding at temperature 0.7 with two drafts: tokens 2-3 are drafts or residual draws,
    token 4 the bonus after a fully accepted chain. Catches (planted and measured at 6000 rows;
    the first failing seed's p-value): the bonus drawn from max(0, p - q_k) instead of p (every
    family, p <= 3e-8), and q scored at temperature 1 while drafts are drawn at 0.7 (every family,
    p <= 3e-5)."""
    for seed in range(3):
        assert_exact(kind, seed, "spec")


@pytest.mark.parametrize("kind", FAMILIES)
def test_tree_sampling_has_the_exact_joint_distribution(kind):
    """Tree decoding: two candidates per level, two levels (sequential modules: level 2 from
    module 2 on the top-1 chain)."""
    tree = StaticTree([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    for seed in range(2):
        assert_exact(kind, seed, "tree", tree=tree, draft=2)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_chain_sampling_with_top_k_and_top_p_is_exact(kind):
    for seed in range(3):
        assert_exact(kind, seed, "spec", temperature=0.9, top_k=5, top_p=0.8)


# ---- draft plumbing and acceptance statistics: replayed from full forward passes -------------------------
@torch.no_grad()
def reference_drafts(model, seq: list[int], k: int) -> tuple[list[int], list]:
    """The k greedy drafts after `seq` (its last token is the pending one, at position C).

    Depth j read at the last accepted position C-1 predicts position C+j. Parallel and Medusa heads
    see only the accepted prefix; sequential module j sees h^{j-1} there and the token at C-1+j,
    i.e. the pending token (j = 1) or the previous depth's draft, so it is recomputed with the
    drafts so far appended. Also returns the main model's logits at positions C..C+k-1, over
    seq + drafts (what verifies draft j once drafts 1..j-1 are accepted).
    """
    C = len(seq) - 1
    drafts: list[int] = []
    for j in range(1, k + 1):
        hs = model(torch.tensor([seq + drafts]))
        drafts.append(int(model.logits(hs[j][0, C - 1], j).argmax()))
    hs = model(torch.tensor([seq + drafts]))
    return drafts, model.logits(hs[0][0, C: C + k])


def replay(model, prompt: list[int], out: list[int], max_new: int, k: int, accept) -> tuple[int, int, list[int]]:
    """Steps, tokens taken after prefill, and accepted counts per draft position, of one row.

    `accept(j, draft, main_logits_j)` says whether draft j passes; the output `out` supplies the
    bonus tokens (and, at temperature 0, must agree with the accepted drafts).
    """
    seq = prompt + out[:1]
    count, steps, taken_sum, accepted = 1, 0, 0, [0] * k
    while count < max_new:
        drafts, logits = reference_drafts(model, seq, k)
        n = 0
        while n < k and accept(n, drafts[n], logits[n]):
            n += 1
        taken = min(n + 1, max_new - count)
        assert out[count: count + min(n, taken)] == drafts[: min(n, taken)]  # accepted drafts are emitted
        steps, taken_sum = steps + 1, taken_sum + taken
        accepted = [a + (n > j) for j, a in enumerate(accepted)]
        count += taken
        seq = prompt + out[:count]
    return steps, taken_sum, accepted


def check_stats(model, prompts, outs, stats, max_new: int, k: int, accept) -> None:
    rows = [replay(model, p, o, max_new, k, accept) for p, o in zip(prompts, outs)]
    row_steps = sum(r[0] for r in rows)
    assert stats.row_steps == row_steps
    assert stats.tau == pytest.approx(sum(r[1] for r in rows) / row_steps, rel=1e-12)
    expected = [sum(r[2][j] for r in rows) / row_steps for j in range(k)]
    assert stats.acceptance_per_position == pytest.approx(expected, rel=1e-12)


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.logits(model(torch.tensor([seq]))[0][0, -1]).argmax()))
    return seq[len(prompt):]


PLUMBING_PROMPTS = [[3, 5, 2], [7, 1, 4, 4, 6], [2], [6, 6, 0, 3]]


@pytest.mark.parametrize("kind", FAMILIES + [SHARED, FUSED])
@pytest.mark.parametrize("mode", ["spec", "tree"])
def test_greedy_tau_and_acceptance_equal_a_replay_from_full_forward_passes(kind, mode):
    """Exact tau and acceptance per position, with heads whose drafts depend on the hidden state.

    Tree mode uses a chain-shaped tree (rank 0 at every level), whose acceptance is the chain's. Catches drafts read at fed index 0 instead of the last
    accepted position (chain and tree planted separately), and a sequential drafter reading h^0
    one position early; the outputs alone stay correct under all three.
    """
    k = 2
    tree = StaticTree([(0,) * d for d in range(1, k + 1)]) if mode == "tree" else None
    max_new = 24
    total_accepted = 0
    for seed in range(3):
        model = random_model(kind, 2, seed, head_std=0.3)
        outs, stats = generate(model, PLUMBING_PROMPTS, max_new, mode=mode, draft=k, tree=tree)
        assert outs == [greedy_reference(model, p, max_new) for p in PLUMBING_PROMPTS]
        check_stats(model, PLUMBING_PROMPTS, outs, stats, max_new, k,
                    lambda j, d, logits: d == int(logits.argmax()))
        total_accepted += sum(stats.acceptance_per_position)
    assert total_accepted > 0.2  # the replay compares steps that accepted drafts, not only rejections


@pytest.mark.parametrize("kind", FAMILIES + [SHARED])
@pytest.mark.parametrize("k", [1, 2])
def test_drafting_fewer_tokens_than_the_model_has_heads_uses_the_first_heads(kind, k):
    """A depth-3 model drafting k < 3 tokens a step: tau and acceptance per position equal the
    replay whose drafts come from the model's first k heads by full forward passes (the heads'
    states are sliced by head, not by position)."""
    max_new = 20
    accepted = 0.0
    for seed in range(2):
        model = random_model(kind, 3, seed, head_std=0.3, n_layers=4)
        outs, stats = generate(model, PLUMBING_PROMPTS, max_new, mode="spec", draft=k)
        assert outs == [greedy_reference(model, p, max_new) for p in PLUMBING_PROMPTS]
        check_stats(model, PLUMBING_PROMPTS, outs, stats, max_new, k, lambda j, d, logits: d == int(logits.argmax()))
        accepted += sum(stats.acceptance_per_position)
    assert accepted > 0.1  # steps that accepted drafts are compared, not only rejections


TYPICAL_EPS, TYPICAL_DELTA = 0.09, 0.3  # Medusa (Cai et al. 2024): posterior_threshold, posterior_alpha


@pytest.mark.parametrize("kind", FAMILIES)
def test_lossy_typical_acceptance_follows_medusas_rule(kind):
    """Drafts (the heads' argmax) pass while p(d) > min(eps, delta * exp(-H(p))), p at temperature T.

    The bonus tokens are random, so the replay follows each row's output; which drafts pass is
    then fixed. Catches typical acceptance that accepts everything, and one that uses the
    untempered p. Rejections happen (asserted), so accepting all would change the statistics.
    """
    T, max_new = 1.5, 12
    rejected = 0
    for seed in range(2):
        model = random_model(kind, 2, seed, head_std=0.3)
        prompts = [PROMPT] * 16 + PLUMBING_PROMPTS
        outs, stats = generate(model, prompts, max_new, mode="spec", draft=2, temperature=T, seed=seed,
                               lossy_typical=True)
        assert not stats.lossless

        def accept(j, d, logits):
            p = (logits.double() / T).softmax(-1)
            entropy = -float((p * p.log()).sum())
            return float(p[d]) > min(TYPICAL_EPS, TYPICAL_DELTA * math.exp(-entropy))

        check_stats(model, prompts, outs, stats, max_new, 2, accept)
        rejected += stats.acceptance_per_position[0] < 1
    assert rejected == 2


def test_lossy_typical_tree_verification_tests_each_node_under_its_parents_distribution():
    """`verify_tree(typical=True)` against a walk written out here: a node passes when its parent
    passed and p_parent(token) > min(eps, delta * exp(-H(p_parent))) (Medusa's rule: the target's
    distribution at the parent is the one that predicts the node's token); the deepest passing
    node wins (first on ties). Tokens are the parent's top token or a tail token, so a rule that
    reads the node's own distribution, or skips the parent's verdict, picks other nodes."""
    from multitoken.decoding.sampling import Sampling
    from multitoken.decoding.verify import verify_tree

    T, B, V = 1.0, 64, 12
    parent = torch.tensor([0, 0, 0, 1, 1, 2, 3, 5])
    depth = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3])
    N = len(parent)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, N, V, generator=g, dtype=torch.float64) * 2.5
    p = (logits / T).softmax(-1)
    top, tail = p.argmax(-1), p.argmin(-1)
    pick = torch.rand(B, N, generator=g) < 0.7
    tokens = torch.where(pick, top[:, parent], tail[:, parent])  # by the parent's distribution
    tokens[:, 0] = 0
    u = torch.rand(B, N, generator=g, dtype=torch.float64)
    best, n, _ = verify_tree(logits, tokens, parent.expand(B, N), depth.expand(B, N), 3, Sampling(temperature=T), True, u)
    depths_seen = set()
    for b in range(B):
        ok = [True] * N
        for i in range(1, N):
            q = p[b, parent[i]]
            entropy = -float((q * q.log()).sum())
            ok[i] = ok[parent[i]] and float(q[tokens[b, i]]) > min(TYPICAL_EPS, TYPICAL_DELTA * math.exp(-entropy))
        want = max(range(N), key=lambda i: (ok[i] and int(depth[i]), -i) if ok[i] else (-1, -i))
        assert (int(best[b]), int(n[b])) == (want, int(depth[want])), b
        depths_seen.add(int(depth[want]))
    assert len(depths_seen) >= 3  # rows stop at several depths: rejections and acceptances both happen

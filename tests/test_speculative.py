"""Self-speculative decoding: exact under greedy, lossless under sampling, tau as stubbed heads dictate."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from conftest import FAMILIES, FUSED, SHARED, tiny_model
from multitoken.decoding import drafting
from multitoken.decoding.api import best_draft, engine_for
from multitoken.decoding.api import generate
from multitoken.decoding.sampling import Sampling, probs
from multitoken.decoding.trees import DynamicTree, StaticTree
from multitoken.errors import UserError
from multitoken.model.kv_cache import KVCache

CHAIN_TREE = StaticTree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
TOP1_CHAIN = StaticTree([(0,), (0, 0), (0, 0, 0)])  # a chain as a tree: only rank-0 candidates
SMALL_TREE = StaticTree([(0,), (1,), (0, 0), (0, 1), (1, 0)])


def spread_model(kind: str, depth: int, seed: int = 0, std: float = 0.15, **overrides):
    """A tiny model whose weights are large enough that its tokens vary and its heads disagree."""
    model = tiny_model(kind, depth, seed=seed, n_layers=4, **overrides).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def prompts(seed: int, batch: int, vocab: int = 61) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (batch,), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- greedy: identical to plain decoding ---------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES + [SHARED, FUSED])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_chain_equals_plain_greedy(kind, batch):
    for seed in range(4):
        model = spread_model(kind, 3, seed)
        for draft in (1, 3):
            p = prompts(seed * 7 + draft, batch)
            ref, ref_stats = generate(model, p, 24)
            out, stats = generate(model, p, 24, mode="spec", draft=draft)
            assert out == ref, (kind, seed, draft)
            assert stats.steps <= ref_stats.steps and len(stats.acceptance_per_position) == draft
            assert 1.0 <= stats.tau <= draft + 1


@pytest.mark.parametrize("kind", ["parallel", "medusa"])
@pytest.mark.parametrize("tree", [CHAIN_TREE, 2, 9])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tree_equals_plain_greedy(kind, tree, batch):
    for seed in range(3):
        model = spread_model(kind, 3, seed)
        p = prompts(seed + 50, batch)
        ref, _ = generate(model, p, 24)
        out, stats = generate(model, p, 24, mode="tree", tree=tree)
        assert out == ref, (kind, seed, tree)
        assert 1.0 <= stats.tau <= 4


@pytest.mark.parametrize("kind", ["sequential", FUSED])
@pytest.mark.parametrize("tree", [StaticTree([(0,), (1,), (2,)]), 4, CHAIN_TREE, 9])
def test_greedy_trees_with_sequential_modules_equal_plain_greedy(tree, kind):
    """Depth-1 trees (module 1's top candidates) and deeper ones (module d's candidates on the
    drafter's top-1 chain) give plain greedy output; a static chain-shaped tree accepts at least
    what the chain of the same depth accepts when its drafts are right."""
    for seed in range(3):
        model = spread_model(kind, 3, seed)
        p = prompts(seed + 70, 3)
        ref, _ = generate(model, p, 24)
        draft = 1 if tree == 4 else None
        out, stats = generate(model, p, 24, mode="tree", tree=tree, draft=draft)
        assert out == ref
        assert stats.draft == (1 if tree == 4 else (3 if tree in (CHAIN_TREE, 9) else 1))


def test_greedy_stops_at_eos_and_at_the_context_end_like_plain():
    model = spread_model("parallel", 2, 3, max_seq_len=24)
    p = prompts(5, 4)
    for eos in (None, 13, 28):
        ref, _ = generate(model, p, 40, eos_id=eos)
        assert [len(r) for r in ref] != [40] * 4  # the context (24) or EOS cut every row short
        for mode, tree in (("spec", None), ("tree", 6)):
            assert generate(model, p, 40, mode=mode, tree=tree, eos_id=eos)[0] == ref


def test_lossy_typical_at_temperature_zero_is_greedy():
    model = spread_model("medusa", 2, 1)
    ref, _ = generate(model, [[3, 4, 5]], 16)
    assert generate(model, [[3, 4, 5]], 16, mode="spec", lossy_typical=True)[0] == ref
    assert generate(model, [[3, 4, 5]], 16, mode="tree", tree=5, lossy_typical=True)[0] == ref
    out, _ = generate(model, [[3, 4, 5]], 16, mode="spec", lossy_typical=True, temperature=0.7, seed=0)
    assert len(out[0]) == 16


# ---- stubbed heads: tau ------------------------------------------------------------------------
def stub_heads(model, fake) -> None:
    """Give `model` a head family whose `draft_logits` hook is `fake(model, depth, h, pos)`: the
    same family otherwise (its states, cache layers and drafter), swapped in by class."""
    family = type(model.mtp)
    model.mtp.__class__ = type(f"Stub{family.__name__}", (family,),
                               {"draft_logits": lambda self, shared, k, h, pos=None: fake(model, k, h, pos)})


def oracle(ref: torch.Tensor, vocab: int, right):
    """draft_logits stand-in: depth-k logits name ref's token at the drafted position, or a wrong one.

    `right(call, depth)` decides; `call` counts drafting rounds (round 0 = the prefill's drafts).
    """
    state = {"call": -1}

    def fake(model, depth, h, next_pos):
        if depth == 1:
            state["call"] += 1
        tok = ref.gather(1, next_pos.clamp(max=ref.shape[1] - 1)[:, None])[:, 0]
        if not right(state["call"], depth):
            tok = (tok + 1) % vocab
        return torch.nn.functional.one_hot(tok, vocab).float() * 20.0

    return fake


@pytest.mark.parametrize("kind", FAMILIES)
def test_stubbed_heads_give_the_expected_tau(kind):
    k, V = 3, 61
    model = spread_model(kind, k, 2)
    prompt = [[7, 8, 9, 10]]
    full, _ = generate(model, prompt, 40)
    ref = torch.tensor([prompt[0] + full[0]])
    cases = [  # (right(call, depth), tokens per step pattern, acceptance per position)
        (lambda c, d: True, [k + 1], [1.0] * k),
        (lambda c, d: False, [1], [0.0] * k),
        (lambda c, d: c % 2 == 0, [k + 1, 1], [0.5] * k),
        (lambda c, d: d == 1, [2], [1.0] + [0.0] * (k - 1)),
    ]
    for right, pattern, acceptance in cases:
        stub_heads(model, oracle(ref, V, right))
        steps = 4 * len(pattern)
        n = 1 + sum(pattern) * (steps // len(pattern))  # the prefill's token, then whole steps
        out, stats = generate(model, prompt, n, mode="spec")
        assert out[0] == full[0][:n]
        assert stats.steps == steps
        assert stats.tau == pytest.approx(sum(pattern) / len(pattern))
        assert stats.acceptance_per_position == pytest.approx(acceptance)
        if kind != "sequential":
            out, stats = generate(model, prompt, n, mode="tree", tree=TOP1_CHAIN)
            assert out[0] == full[0][:n] and stats.tau == pytest.approx(sum(pattern) / len(pattern))


def test_stubbed_module_one_gives_the_expected_tau_in_a_depth_one_tree():
    model = spread_model("sequential", 2, 2)
    prompt = [[7, 8, 9, 10]]
    full, _ = generate(model, prompt, 30)
    ref = torch.tensor([prompt[0] + full[0]])
    for right, tau in ((True, 2.0), (False, 1.0)):
        stub_heads(model, oracle(ref, 61, lambda c, d, r=right: r))
        out, stats = generate(model, prompt, 21, mode="tree", tree=StaticTree([(0,), (1,)]))
        assert out[0] == full[0][:21] and stats.tau == pytest.approx(tau) and stats.steps == 20 // int(tau)


def test_rows_advance_by_different_amounts():
    """Row 0's heads are always right, row 1's always wrong: tau per row differs, outputs stay exact."""
    k, V = 2, 61
    model = spread_model("parallel", k, 4)
    p = [[5, 6, 7], [9, 10, 11, 12, 13]]
    full, _ = generate(model, p, 30)
    ref = torch.tensor([p[0] + full[0] + [0, 0], p[1] + full[1]])
    wrong = oracle(ref, V, lambda c, d: False)
    good = oracle(ref, V, lambda c, d: True)

    def mixed(model, depth, h, next_pos):
        a, b = good(model, depth, h, next_pos), wrong(model, depth, h, next_pos)
        return torch.stack([a[0], b[1]])

    stub_heads(model, mixed)
    out, stats = generate(model, p, 25, mode="spec")
    assert out == [r[:25] for r in full]
    # Row 0 needs 8 steps (3 tokens each), row 1 needs 24: tau over row-steps = 48 / 32.
    assert stats.steps == 24 and stats.row_steps == 32 and stats.tau == pytest.approx(48 / 32)


# ---- caches after rollback and compaction ------------------------------------------------------------
@pytest.mark.parametrize("kind,mode", [(f, "spec") for f in FAMILIES] + [("parallel", "tree"), ("medusa", "tree")])
def test_cache_after_rollbacks_equals_a_cache_built_from_scratch(kind, mode):
    k = 3
    model = spread_model(kind, k, 5)
    p = prompts(11, 3)
    out, _ = generate(model, p, 30, mode=mode, tree=DynamicTree(7, k))
    cache = engine_for(model, 3).state.cache  # the engine's cache, as the last call left it
    layers = model.config.n_layers + (k if kind == "parallel" else 0)  # sequential modules: next test
    with torch.no_grad():
        for b in range(3):
            seq = torch.tensor([p[b] + out[b]])[:, : int(cache.pos[b])]
            fresh = KVCache.for_model(model.config, 1)
            T = seq.shape[1]
            pos = torch.arange(T)[None]
            drafting.decode_pass(model, seq, fresh, pos, pos, fresh.causal_mask(pos), k)
            torch.testing.assert_close(cache.k[:layers, b, :, :T], fresh.k[:layers, 0, :, :T], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[:layers, b, :, :T], fresh.v[:layers, 0, :, :T], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sequential", SHARED, FUSED])
@pytest.mark.parametrize("mode,k", [("spec", 3), ("tree", 1), ("tree", 3)])
def test_sequential_drafts_equal_a_full_forward_over_the_accepted_tokens(kind, mode, k):
    """Module k's draft at each step equals the uncached model's depth-k prediction on the same tokens.

    This pins the sliding-window invariant: every module's cache entries that a draft can see were
    written from accepted tokens, never left over from rejected drafts (chain and depth-1 tree).
    A shared module (one module at every depth) must still keep one cache layer per depth.
    """
    model = spread_model(kind, 3, 6)
    prompt = [4, 5, 6, 7, 8]
    calls = []

    def record(model, depth, h, next_pos):
        lg = model.logits(h, depth)
        calls.append((depth, int(next_pos[0]), lg[0].clone()))
        return lg

    stub_heads(model, record)
    out, stats = generate(model, [prompt], 30, mode=mode, draft=k, tree=4)
    tokens = prompt + out[0]
    assert stats.steps > 3 and len(calls) == k * (stats.steps + 1)  # the prefill's drafts, then each step's
    with torch.no_grad():
        for i in range(0, len(calls), k):
            C = calls[i][1] - 1  # the pending token's position
            if C + 1 > len(tokens):
                break
            drafts = [int(lg.argmax()) for _, _, lg in calls[i : i + k]]
            for depth in range(1, k + 1):
                seq = torch.tensor([tokens[: C + 1] + drafts[: depth - 1]])
                h = model(seq)[depth][0, C - 1]
                torch.testing.assert_close(calls[i + depth - 1][2], model.logits(h, depth), atol=1e-4, rtol=1e-4)


# ---- sampling: lossless -------------------------------------------------------------------------
def exact_joint(model, prompt: list[int], s: Sampling, n: int) -> torch.Tensor:
    """P(first n generated tokens) under plain sampling, by enumeration: (V,) * n."""
    V = model.config.vocab_size
    joint = torch.ones(1)
    prefixes = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            p = probs(model.logits(model(prefixes, heads=False)[0][:, -1]), s).double()  # (P, V)
            joint = (joint[:, None] * p).flatten()
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
    return joint


def chi_square_pvalue(samples: list[list[int]], joint: torch.Tensor, V: int) -> float:
    counts = torch.zeros_like(joint)
    for r in samples:
        counts[sum(t * V ** (len(r) - 1 - i) for i, t in enumerate(r))] += 1
    expected = joint * len(samples)
    big = expected >= 5  # merge the rare cells into one so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize("kind,mode,tree", [("parallel", "spec", None), ("sequential", "spec", None),
                                            ("medusa", "spec", None), ("parallel", "tree", SMALL_TREE),
                                            ("medusa", "tree", 6), ("sequential", "tree", 4)])
def test_speculative_sampling_has_the_exact_distribution(kind, mode, tree):
    """The joint law of the first 3 tokens matches the model's exact one (chi-square, 4000 samples).

    4000 rows of one prompt decode in one batch, each row with its own randomness, so drafts get
    accepted and rejected at every depth. With the fixed seed the test is deterministic; under a
    fresh seed a correct implementation fails with probability 1e-3 (the p-value threshold).
    A wrong rule (e.g. drawing the replacement from p instead of max(0, p - q)) gives p ~ 0.
    """
    V, n = 6, 3
    model = spread_model(kind, 2, 3, std=0.5, vocab_size=V)
    s = Sampling(temperature=0.9, top_k=5, top_p=0.95)
    prompt = [2, 3, 4]
    out, stats = generate(model, [prompt] * 4000, n, mode=mode, tree=tree, seed=1234, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p)
    assert 0 < stats.acceptance_per_position[0] < 1  # both branches of the rule were taken
    assert chi_square_pvalue(out, exact_joint(model, prompt, s, n), V) > 1e-3


def test_plain_sampling_has_the_exact_distribution_and_is_seeded():
    V = 6
    model = spread_model("none", 0, 3, std=0.5, vocab_size=V)
    s = Sampling(temperature=0.9, top_k=5, top_p=0.95)
    out, _ = generate(model, [[2, 3, 4]] * 4000, 3, seed=7, temperature=0.9, top_k=5, top_p=0.95)
    assert chi_square_pvalue(out, exact_joint(model, [2, 3, 4], s, 3), V) > 1e-3
    again, _ = generate(model, [[2, 3, 4]] * 4000, 3, seed=7, temperature=0.9, top_k=5, top_p=0.95)
    assert again == out


# ---- errors -------------------------------------------------------------------------------------
def test_user_errors_are_one_line():
    model = spread_model("parallel", 2, 0)
    seq = spread_model("sequential", 2, 0)
    plain = spread_model("none", 0, 0)
    cases = [
        lambda: generate(model, [[3]], 4, mode="spec", draft=3),
        lambda: generate(model, [[3]], 4, mode="spec", draft=0),
        lambda: generate(plain, [[3]], 4, mode="spec"),
        lambda: generate(model, [[]], 4, mode="spec"),
        lambda: generate(model, [list(range(2, 60))] * 2 + [[3] * 64], 4),
        lambda: generate(model, [[3]], 4, mode="beam"),
        lambda: generate(model, [[3]], 4, temperature=-1),
        lambda: generate(model, [[3]], 4, mode="tree", tree=StaticTree([(0,), (0, 0), (0, 0, 0)])),
    ]
    for case in cases:
        with pytest.raises(UserError) as e:
            case()
        assert "\n" not in str(e.value)


# ---- live-slot buckets and the draft-length choice ------------------------------------------------------
def test_attention_over_live_buckets_equals_a_full_forward():
    """With a long context, steps attend only to a power-of-two bucket of live slots; crossing
    buckets (64 -> 128 -> 256) must not change anything: cached plain greedy equals recomputing
    each row's whole sequence without a cache, and speculative output equals plain."""
    from multitoken.decoding.runner import bucket

    assert [bucket(n, 1000) for n in (1, 64, 65, 129, 999)] == [64, 64, 128, 256, 1000]
    model = spread_model("parallel", 3, 9, max_seq_len=512)
    rows = [list(range(2, 52)), [5, 6, 7]]
    out, _ = generate(model, rows, 120)
    with torch.no_grad():
        for r, o in zip(rows, out):
            seq = torch.tensor([r + o])
            full = model.logits(model(seq[:, :-1], heads=False)[0]).argmax(-1)[0, len(r) - 1 :]
            assert full.tolist() == o
    for mode in ("spec", "tree"):
        assert generate(model, rows, 120, mode=mode)[0] == out


def test_best_draft_maximises_expected_tokens_per_second():
    costs = {0: 1.0, 1: 1.15, 2: 1.25, 3: 1.35}
    assert best_draft([0.9, 0.8, 0.7], costs) == 3  # (1 + 2.4) / 1.35 beats the rest
    assert best_draft([0.1, 0.05, 0.0], costs) == 0  # drafts that are rarely right do not pay
    assert best_draft([0.5, 0.05, 0.0], costs) == 1  # 1.5 / 1.15 = 1.30 beats 1.55 / 1.25 = 1.24
    assert best_draft([0.0, 0.0, 0.0], {0: 1.0, 3: 1.0}) == 0  # ties go to the shorter draft


@pytest.mark.slow
def test_compiled_blocks_decode_like_eager_blocks_and_report_compile_time():
    """The runner's compiled `Block.cached` (inductor on the CPU) gives the eager blocks' greedy
    output for plain, chain and tree decoding; the first call reports its compilation time."""
    model = spread_model("parallel", 2, 7)
    p = prompts(3, 2)
    ref, _ = generate(model, p, 12)
    out, stats = generate(model, p, 12, compile=True)
    assert out == ref and stats.compile_time_s > 0
    for mode in ("spec", "tree"):
        assert generate(model, p, 12, mode=mode, compile=True)[0] == ref
    assert generate(model, p, 12, compile=True)[1].compile_time_s == 0  # compiled once, reused

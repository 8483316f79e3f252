"""The reduced draft vocabulary V': chosen from token counts, stored in heads files as EAGLE-3's
d2t/t2d maps, only |V'| rows of the unembedding computed; greedy never drafts outside V' and stays
identical to plain decoding; sampling keeps the exact distribution (q = 0 outside V')."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import FAMILIES, SHARED, tiny_model
from multitoken.data.draft_vocab import count_tokens, frequent_tokens
from multitoken.decoding import drafting
from multitoken.decoding.api import generate
from multitoken.decoding.trees import StaticTree
from multitoken.errors import UserError
from test_exactness import PLUMBING_PROMPTS, PROMPT, V, check_stats, chi2_pvalue, exact_joint, greedy_reference, random_model


# ---- choosing V' -----------------------------------------------------------------------------------
def test_frequent_tokens_rank_by_count_then_id_and_keep_the_ones_asked():
    counts = np.array([5, 0, 9, 9, 1, 3])
    assert frequent_tokens(counts, 3).tolist() == [0, 2, 3]
    assert frequent_tokens(counts, 3, always=[1]).tolist() == [1, 2, 3]  # EOS kept although never seen
    assert frequent_tokens(counts, 6).tolist() == list(range(6))
    for size in (0, 7):
        with pytest.raises(UserError, match="choose a size"):
            frequent_tokens(counts, size)


@pytest.fixture
def data_and_heads(tmp_path):
    """A byte-level plain run, a DATA_DIR prepared with its tokenizer, and a heads file for it."""
    from multitoken.data.prepare import prepare
    from multitoken.data.tokenizer import Tokenizer
    from multitoken.io.checkpoint import save_run
    from multitoken.io.heads_file import save_heads

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text("".join(f"def f{j}(x):\n    return x * {j + i}\n\n" for j in range(20)))
    model = tiny_model("medusa", 2, seed=1, vocab_size=257, eos_id=256).eval()
    plain = tiny_model("none", 0, seed=1, vocab_size=257, eos_id=256)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    save_run(tmp_path / "base", plain, Tokenizer.bytes())
    prepare(str(corpus), str(tmp_path / "base"), tmp_path / "data", val_fraction=0.2, progress=False)
    return tmp_path / "base", tmp_path / "data", save_heads(model, tmp_path / "heads.safetensors"), model


def test_token_counts_of_a_data_dir_are_its_train_shard_counted(data_and_heads):
    from multitoken.data.prepare import shard_path
    from multitoken.data.shards import read_shard

    _, data, _, _ = data_and_heads
    want = Counter(read_shard(shard_path(data, "train")).tolist())
    counts = count_tokens(data)
    assert counts.shape == (257,) and {t: int(c) for t, c in enumerate(counts) if c} == dict(want)


def test_the_cli_stores_the_map_in_a_heads_file_that_attaches_with_it(data_and_heads, tmp_path, capsys):
    from safetensors.torch import load_file

    from multitoken.cli import main as cli_main
    from multitoken.io.heads_file import attach_heads

    base, data, heads, _ = data_and_heads
    assert attach_heads(base, heads)[0].mtp.draft_ids is None  # a file without a map: full vocabulary
    out = tmp_path / "small.safetensors"
    assert cli_main(["draft-vocab", "--data", str(data), "--size", "20", "--heads-file", str(heads), "--out", str(out)]) == 0
    assert "20 of 257 tokens" in capsys.readouterr().out
    counts = count_tokens(data)
    want = frequent_tokens(counts, 20, always=[256])
    assert 256 in want.tolist() and set(np.argsort(-counts, kind="stable")[:19].tolist()) | {256} == set(want.tolist())
    t = load_file(str(out))
    # EAGLE-3's layout, written out: target id = i + d2t[i]; t2d marks V'.
    assert (t["d2t"] + torch.arange(20)).tolist() == want.tolist()
    assert t["t2d"].dtype == torch.bool and t["t2d"].nonzero()[:, 0].tolist() == want.tolist()
    model, _ = attach_heads(base, out)
    assert model.mtp.draft_ids.tolist() == want.tolist()
    # save_heads keeps the map of a model that has one.
    from multitoken.io.heads_file import save_heads

    again, _ = attach_heads(base, save_heads(model, tmp_path / "again.safetensors"))
    assert again.mtp.draft_ids.tolist() == want.tolist()


def test_damaged_or_foreign_maps_are_one_line_errors(data_and_heads, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from multitoken.cli import main as cli_main
    from multitoken.io.heads_file import attach_heads, write_draft_vocab

    base, data, heads, _ = data_and_heads
    path = write_draft_vocab(heads, torch.tensor([1, 5, 9]), 257, tmp_path / "map.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    bad_t2d = tensors["t2d"].clone()
    bad_t2d[2] = True
    for name, over in (("disagree", {"t2d": bad_t2d}), ("short", {"t2d": tensors["t2d"][:100]}),
                       ("unsorted", {"d2t": torch.tensor([5, -1, 7])})):
        bad = tmp_path / f"{name}.safetensors"
        save_file({**tensors, **over}, str(bad), metadata=meta)
        with pytest.raises(UserError, match="draft vocabulary") as e:
            attach_heads(base, bad)
        assert "\n" not in str(e.value)
    assert cli_main(["draft-vocab", "--data", str(data), "--size", "999", "--heads-file", str(heads)]) == 2
    assert cli_main(["draft-vocab", "--data", str(data), "--size", "8", "--heads-file", str(data / "meta.json")]) == 2
    assert load_file(str(heads)).keys() == load_file(str(data_and_heads[2])).keys()  # a refused call wrote nothing


# ---- drafting over V' -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES)
def test_draft_logits_compute_only_the_rows_of_v_prime_and_follow_the_weights(kind):
    model = tiny_model(kind, 2, seed=3).eval()
    ids = torch.tensor([2, 3, 7, 11, 40, 60])
    model.mtp.set_draft_vocab(ids[[3, 0, 5, 1, 4, 2]])  # any order: kept sorted
    assert model.mtp.draft_ids.tolist() == ids.tolist()
    h = torch.randn(3, model.config.dim)
    with torch.no_grad():
        for k in (1, 2):
            got = model.mtp.draft_logits(model.shared, k, h)
            assert got.shape == (3, 6)
            torch.testing.assert_close(got, model.logits(h, k)[:, ids], atol=1e-6, rtol=0)
            w = model.unembed_weight(k)
            assert model.mtp._draft_weight(k, w) is model.mtp._draft_weight(k, w)  # indexed once
            assert model.mtp._draft_weight(k, w).shape == (6, model.config.dim)
            full = drafting.draft_logits(model, k, h, torch.zeros(3, dtype=torch.long))
            want = torch.full((3, model.config.vocab_size), float("-inf"))
            want[:, ids] = model.logits(h, k)[:, ids]
            torch.testing.assert_close(full, want, atol=1e-6, rtol=0)
        model.unembed_weight(1).mul_(-2.0)  # written in place: the cached rows must follow
        torch.testing.assert_close(model.mtp.draft_logits(model.shared, 1, h), model.logits(h, 1)[:, ids], atol=1e-6, rtol=0)
        model.double()  # moved: new tensors
        torch.testing.assert_close(model.mtp.draft_logits(model.shared, 1, h.double()), model.logits(h.double(), 1)[:, ids])
        model.mtp.set_draft_vocab(None)
        assert model.mtp.draft_logits(model.shared, 1, h.double()).shape == (3, model.config.vocab_size)


class Restricted:
    """The reference model for a replay: its heads' logits over V' only (the rest -inf)."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        self.model, self.outside = model, torch.ones(model.config.vocab_size, dtype=torch.bool)
        self.outside[ids] = False

    def __call__(self, *a, **kw):
        return self.model(*a, **kw)

    def logits(self, h, depth: int = 0):
        lg = self.model.logits(h, depth)
        return lg if depth == 0 else lg.masked_fill(self.outside, float("-inf"))


V_PRIME = torch.tensor([0, 2, 3, 6])
"""Half of the test vocabulary (V = 8)."""


@pytest.mark.parametrize("kind", FAMILIES + [SHARED])
@pytest.mark.parametrize("mode", ["spec", "tree"])
def test_greedy_with_a_draft_vocab_equals_plain_and_drafts_the_best_token_of_v_prime(kind, mode):
    """Output identical to plain greedy; tau and acceptance per position equal a replay from full
    forward passes whose drafts are the heads' argmax over V' (so a draft outside V' shows)."""
    k = 2
    tree = StaticTree([(0,) * d for d in range(1, k + 1)]) if mode == "tree" else None
    accepted = 0.0
    for seed in range(3):
        model = random_model(kind, 2, seed, head_std=0.3)
        model.mtp.set_draft_vocab(V_PRIME)
        outs, stats = generate(model, PLUMBING_PROMPTS, 24, mode=mode, draft=k, tree=tree)
        assert outs == [greedy_reference(model, p, 24) for p in PLUMBING_PROMPTS]
        check_stats(Restricted(model, V_PRIME), PLUMBING_PROMPTS, outs, stats, 24, k,
                    lambda j, d, logits: d == int(logits.argmax()))
        accepted += sum(stats.acceptance_per_position)
    assert accepted > 0.2


ROWS, M, ALPHA = 6000, 4, 1e-4


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("mode", ["spec", "tree"])
def test_sampling_with_a_draft_vocab_has_the_exact_joint_distribution(kind, mode):
    """q is zero outside V' and the acceptance rule is unchanged: the first 4 tokens at temperature
    0.7 follow the model's exact joint law (chi-square against enumeration, as test_exactness)."""
    tree = StaticTree([(0,), (1,), (0, 0), (0, 1), (1, 0)]) if mode == "tree" else None
    for seed in range(2):
        model = random_model(kind, 2, seed)
        model.mtp.set_draft_vocab(V_PRIME)
        joint = exact_joint(model, PROMPT, M, 0.7)
        out, stats = generate(model, [PROMPT] * ROWS, M, mode=mode, draft=2, tree=tree, temperature=0.7, seed=2000 + seed)
        assert 0.01 < stats.acceptance_per_position[-1] and stats.acceptance_per_position[0] < 0.95
        assert sum(t not in V_PRIME.tolist() for o in out for t in o[1:3]) > ROWS // 10  # mass outside V' is emitted
        p = chi2_pvalue(out, joint)
        assert p > ALPHA, (kind, mode, seed, p)

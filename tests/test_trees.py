"""Draft trees: static construction, dynamic trees, ancestor masks, top-k measurement, the tree command."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import tiny_model
from multitoken.cli import main
from multitoken.errors import UserError
from multitoken.io.checkpoint import read_json, save_run
from multitoken.decoding.trees import (DynamicTree, StaticTree, ancestors, as_tree, build_nodes, build_static, dynamic_nodes,
                                       expected_accept_length, resolve_tree)
from multitoken.training.evaluate import measure_topk_accuracy


def test_static_tree_is_built_greedily_by_path_probability():
    acc = [[0.8, 0.1], [0.6, 0.2]]
    tree = build_static(acc, 4)
    # (0,) 0.8, then (0,0) 0.48, then (0,1) 0.16 beats (1,) 0.10.
    assert tree.paths == [(0,), (0, 0), (0, 1)]
    assert expected_accept_length(tree, acc) == pytest.approx(1 + 0.8 + 0.48 + 0.16)
    assert build_static(acc, 5).paths == [(0,), (1,), (0, 0), (0, 1)]
    assert build_static(acc, 100).nodes == 1 + 2 + 4  # every path of 2 ranks x 2 depths


def test_static_tree_greedy_is_optimal_on_small_cases():
    """For a node budget, no other tree closed under prefixes has a larger expected length."""
    acc = [[0.5, 0.3, 0.1], [0.7, 0.2, 0.05], [0.4, 0.3, 0.2]]
    all_paths = [p for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    value = lambda paths: sum(math.prod(acc[i][r] for i, r in enumerate(p)) for p in paths)  # noqa: E731
    for n in (2, 4, 6):
        best = max(value(c) for c in itertools.combinations(all_paths, n - 1)
                   if all(p[:-1] in c or len(p) == 1 for p in c))
        assert value(build_static(acc, n).paths) == pytest.approx(best)


def test_tree_nodes_and_ancestors():
    tree = StaticTree([(1,), (0,), (0, 0), (0, 1), (0, 0, 2)])
    parent, depth, rank = tree.tensors("cpu")
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 2)]
    assert parent.tolist() == [0, 0, 0, 1, 1, 3] and depth.tolist() == [0, 1, 1, 2, 2, 3]
    anc = ancestors(parent[None], 3)[0]
    assert anc[5].nonzero().flatten().tolist() == [0, 1, 3, 5]
    assert anc[2].nonzero().flatten().tolist() == [0, 2]
    lq = torch.tensor([[[0.0, 5, 4, 3], [9, 0, 1, 2], [0, 1, 2, 3]]])  # ranks: d1 1,2,3,0; d2 0,3,2,1; d3 3,2,1,0
    tokens, _, _ = build_nodes(tree, torch.tensor([7]), lq)
    assert tokens.tolist() == [[7, 1, 2, 0, 3, 1]]
    with pytest.raises(UserError):
        StaticTree([(0, 0)])
    with pytest.raises(UserError):
        as_tree(StaticTree([(0,), (0, 0), (0, 0, 0)]), None, 2)
    assert as_tree(StaticTree([(0,), (0, 0), (0, 0, 0)]), 2, 3).depth == 2
    t = as_tree(resolve_tree("dynamic:16", "."), 1, 3)  # the CLI's form, cut to depth 1: widened to fit
    assert (t.nodes, t.depth) == (16, 1) and t.width >= 15
    with pytest.raises(UserError):
        resolve_tree("dynamic:x", ".")


def test_dynamic_tree_keeps_the_most_probable_paths():
    """Against brute force: the kept nodes are the N-1 highest path probabilities, parents first."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 5, 3, 9
    lq = torch.randn(2, k, V, generator=g) * 2
    tokens, parent, depth = dynamic_nodes(torch.tensor([1, 2]), lq, N, width=V)
    lp = lq.log_softmax(-1)
    for b in range(2):
        assert (parent[b, 1:] < torch.arange(1, N)).all()
        assert (depth[b, 1:] == depth[b, parent[b, 1:]] + 1).all()
        for i in range(N):  # siblings carry distinct tokens
            kids = tokens[b][(parent[b] == i) & (torch.arange(N) > 0)].tolist()
            assert len(kids) == len(set(kids))
        score = {}
        for i in range(1, N):
            path, j = [], i
            while j:
                path.append(int(tokens[b, j]))
                j = int(parent[b, j])
            path = tuple(reversed(path))
            score[path] = sum(float(lp[b, d, t]) for d, t in enumerate(path))
        brute = sorted((sum(float(lp[b, d, t]) for d, t in enumerate(p)), p)
                       for n in (1, 2, 3) for p in itertools.product(range(V), repeat=n))[::-1][: N - 1]
        assert sorted(score.values()) == pytest.approx(sorted(s for s, _ in brute), abs=1e-3)
    with pytest.raises(UserError):
        DynamicTree(1, 2)


def test_topk_accuracy_sums_to_one_over_the_whole_vocabulary():
    model = tiny_model("medusa", 2, vocab_size=12).eval()
    windows = [torch.randint(2, 12, (2, 17)) for _ in range(2)]
    acc, n = measure_topk_accuracy(model, windows, ranks=12)
    assert n == 2 * 2 * 15 and len(acc) == 2
    assert [sum(r) for r in acc] == pytest.approx([1.0, 1.0])
    with torch.no_grad():
        out = model(windows[0][:, :-1])
        top1 = model.logits(out[1], 1).argmax(-1)[:, :-1]  # depth 1 predicts 2 ahead
    acc1, _ = measure_topk_accuracy(model, windows[:1], ranks=1)
    assert acc1[0][0] == pytest.approx((top1 == windows[0][:, 2:]).float().mean().item())


def test_tree_command_writes_a_tree_that_generate_uses(tmp_path, capsys):
    from multitoken.data.prepare import prepare
    from multitoken.data.tokenizer import Tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 20)
    prepare(str(corpus), "bytes", tmp_path / "data", val_fraction=0.2, progress=False)
    tok = Tokenizer.bytes()
    torch.manual_seed(0)
    model = tiny_model("parallel", 2, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=32)
    run = tmp_path / "run"
    save_run(run, model, tok)
    assert main(["tree", "--run", str(run), "--data", str(tmp_path / "data"), "--nodes", "6", "--batches", "2",
                 "--ranks", "4"]) == 0
    data = read_json(run / "tree.json")
    assert data["nodes"] == 6 and len(data["paths"]) == 5 and len(data["topk_accuracy"]) == 2
    assert data["expected_tau"] >= 1.0
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "def", "--mode", "tree", "--max-new-tokens", "6",
                 "--json"]) == 0
    assert len(__import__("json").loads(capsys.readouterr().out)["token_ids"]) == 6


def test_tree_files_missing_or_malformed_are_one_line_errors_that_say_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match=r"tree file .*missing.json not found: write one with `multitoken tree --run"):
        resolve_tree(str(tmp_path / "missing.json"), tmp_path)
    bad = {"not-json": b"{paths", "not-utf8": b"\xff\xfe", "no-paths": b'{"nodes": 3}', "number": b'{"paths": 5}',
           "strings": b'{"paths": [["a"]]}', "negative": b'{"paths": [[-1]]}', "orphan": b'{"paths": [[0, 0]]}',
           "list": b"[1]", "huge-rank": b'{"paths": [[100000]]}', "bool": b'{"paths": [[true]]}',
           "too-many": json.dumps({"paths": [[i] for i in range(2000)]}).encode()}
    for name, data in bad.items():
        f = tmp_path / f"{name}.json"
        f.write_bytes(data)
        with pytest.raises(UserError, match=f"tree file .*{name}.json") as e:
            resolve_tree(str(f), tmp_path)
        assert "\n" not in str(e.value), name
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"paths": [[0], [1], [0, 0]], "nodes": 4}))
    assert resolve_tree(str(good), tmp_path).paths == [(0,), (1,), (0, 0)]


@pytest.mark.parametrize("spec", ["dynamic:²", "dynamic:١٦", "dynamic:1", "dynamic:1000000", "dynamic:-4", "dynamic:4.0"])
def test_dynamic_tree_sizes_are_ascii_and_bounded(spec):
    with pytest.raises(UserError, match="dynamic:N"):
        resolve_tree(spec, ".")
    assert resolve_tree("dynamic:1024", ".").nodes == 1024


def test_a_dynamic_tree_of_any_size_holds_its_nodes_and_decodes_like_plain_greedy():
    """The default width must let depth x width candidates cover nodes - 1 (else `build_nodes`
    refuses the tree), for every size and depth; and a wide dynamic tree (30 nodes over 3 heads:
    29 / 3 is not whole) decodes exactly as plain greedy decoding by full forward passes."""
    from multitoken.decoding.api import generate
    from test_speculative import spread_model

    for nodes in range(2, 130):
        for depth in range(1, 9):
            t = DynamicTree(nodes, depth)
            assert t.depth * t.width >= t.nodes - 1, (nodes, depth, t.width)
    model = spread_model("parallel", 3, 11)
    prompt = [3, 9, 27, 1]
    out, _ = generate(model, prompt, 12, mode="tree", tree=DynamicTree(30, 3))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model.logits(model(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
    assert out[0] == seq[len(prompt):]

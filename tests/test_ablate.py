"""`multitoken ablate` and its metrics: a 2-config x 2-seed study end to end, resume after an
interruption equals an uninterrupted study, equal-compute steps against FLOPs counted by hand,
bits per byte and next-line exact match against hand computations."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from multitoken.cli import build_parser, main
from multitoken.cli.ablate import study_config
from multitoken.data.tokenizer import Tokenizer
from multitoken.experiments.quality import (LineCase, bits_per_byte, is_exact_line, main_head_nats, next_line_cases,
                                            next_line_exact_match)
from multitoken.experiments.study import build_study
from multitoken.training.loss import IGNORE_INDEX

CONFIGS = ["plain=none", "p2=parallel:1/w=geometric:0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A DATA_DIR of small .py files (non-ASCII comments: bytes differ from characters), bpe:300."""
    root = tmp_path_factory.mktemp("ablate")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        lines = [f"# módulo {i} — ünïcode ✓", "", f"def f{i}(x):"]
        lines += [f"    x = x + {rng.randrange(10)}" for _ in range(rng.randrange(3, 8))]
        (corpus / f"m{i:02d}.py").write_text("\n".join(lines + ["    return x"]) + "\n")
    out = root / "data"
    assert main(["prepare", "--corpus", str(corpus), "--glob", "*.py", "--tokenizer", "bpe:300", "--out", str(out),
                 "--val-fraction", "0.2", "--quiet"]) == 0
    return out


def ablate_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", "--data", str(data), "--out", str(out), "--configs", *CONFIGS, "--steps", "6", "--batch-size", "2",
            "--seq-len", "32", "--seeds", "2", "--eval-every", "3", "--line-cases", "6", "--chunk-steps", "4",
            "--device", "cpu", "--quiet", *extra]


def deterministic(report: dict) -> dict:
    """ablate.json without what depends on the clock or the invocation (timing, date, command)."""
    runs = [{**r, "result": {k: v for k, v in r["result"].items() if k != "timing"}} for r in report["runs"]]
    rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in report["rows"]]
    return {"runs": runs, "rows": rows, "chosen": report["picks"], "complete": report["complete"]}


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(ablate_args(data, out)) == 0
    torch.set_num_threads(n)
    return out


def test_study_trains_both_axes_and_seeds_and_writes_table_plot_json(finished):
    report = json.loads((finished / "ablate.json").read_text())
    assert report["complete"] and report["picks"] == {"best:2": ["p2"]}  # the only candidate is chosen for more seeds
    folders = sorted(r["folder"] for r in report["runs"])
    # plain serves both axes with one run per seed; p2 trains fewer steps at equal compute
    steps_c = next(r["steps"] for r in report["rows"] if r["axis"] == "compute" and r["config"] == "p2")
    assert steps_c < 6
    assert folders == sorted([f"runs/tiny/plain/seed{s}-steps6" for s in (0, 1)] + [f"runs/tiny/p2/seed{s}-steps6" for s in (0, 1)]
                             + [f"runs/tiny/p2/seed{s}-steps{steps_c}" for s in (0, 1)])
    for r in report["runs"]:
        res = r["result"]
        assert (finished / r["folder"] / "ablate_result.json").is_file() and not (finished / r["folder"] / "checkpoints").exists()
        assert res["bits_per_byte"] > 0 and res["next_line_cases"] == 6 and res["curve"][-1][0] == res["steps"]
        assert [p[0] for p in res["curve"]] == sorted({3, res["steps"]})  # eval_every points and the end, nothing else
    rows = {(r["axis"], r["config"]): r for r in report["rows"]}
    assert rows[("tokens", "plain")]["seeds"] == 2 and rows[("compute", "p2")]["seeds"] == 2
    assert rows[("tokens", "plain")]["val_loss_vs_plain"] == 0
    assert rows[("tokens", "p2")]["second_token_acceptance_teacher_forced"] is not None
    md = (finished / "ablate.md").read_text()
    assert "| tokens | p2 | parallel:1 | geometric:0.5 |" in md and "bits/byte" in md and "next-line EM" in md
    assert (finished / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_study_resumes_and_equals_the_uninterrupted_one(data, finished, tmp_path):
    out = tmp_path / "out"
    assert main(ablate_args(data, out, "--max-steps", "11")) == 0  # stops inside the second run
    first = json.loads((out / "ablate.json").read_text())
    assert not first["complete"]
    done = {r["folder"]: (out / r["folder"] / "ablate_result.json").stat().st_mtime_ns for r in first["runs"] if r["result"]}
    assert len(done) == 1
    cut = next(r["folder"] for r in first["runs"] if not r["result"] and (out / r["folder"] / "checkpoints").is_dir())
    assert json.loads((out / cut / "checkpoints" / "latest.json").read_text())["dir"] == "step_00000005"
    assert main(ablate_args(data, out)) == 0
    resumed = json.loads((out / "ablate.json").read_text())
    assert {f: (out / f / "ablate_result.json").stat().st_mtime_ns for f in done} == done  # finished runs were skipped
    assert deterministic(resumed) == deterministic(json.loads((finished / "ablate.json").read_text()))


def hand_flops(d: int, L: int, nh: int, nkv: int, hd: int, inter: int, V: int, T: int, kind: str, D: int) -> float:
    """FLOPs per token counted from the shapes: 6 x matrix weights (+ one V x d per depth) + 6 d T per block,
    and one more forward of the recomputed head blocks (parallel and sequential heads recompute)."""
    block = d * nh * hd + 2 * d * nkv * hd + nh * hd * d + 3 * d * inter
    head = block + (2 * d * d if kind == "sequential" else 0)  # eh_proj
    total = 6 * (L * block + D * head + (1 + D) * V * d) + 6 * d * T * (L + D)
    return total + (2 * D * head + 2 * d * T * D if D else 0)


def test_equal_compute_steps_follow_the_flop_formula(data):
    args = build_parser().parse_args(["ablate", "--data", str(data), "--out", "unused", "--steps", "1000", "--seq-len", "64",
                                      "--configs", "plain=none", "p2=parallel:1", "p3=parallel:3", "s1=sequential:1",
                                      "s2=sequential:2", "--device", "cpu"])
    study = build_study(study_config(args))
    V = json.loads((data / "meta.json").read_text())["vocab_size"]
    shape = dict(d=96, L=4, nh=4, nkv=2, hd=24, inter=256, V=V, T=64)  # the tiny preset
    plain = hand_flops(**shape, kind="none", D=0)
    for c in study.plan().variants():
        kind, _, depth = c.heads.partition(":")
        f = hand_flops(**shape, kind=kind, D=int(depth or 0))
        assert study.flops(c) == pytest.approx(f, rel=1e-12)
        assert study.steps_for(c, "compute") == round(1000 * plain / f)
        assert study.steps_for(c, "tokens") == 1000


def test_bits_per_byte_by_hand():
    nats = torch.tensor([[1.0, 2.0, 9.0, 3.0, 4.0]], dtype=torch.float64)
    targets = torch.tensor([[5, 2, IGNORE_INDEX, 0, 7]])
    token_bytes = torch.tensor([0, 0, 1, 0, 0, 3, 0, 2])  # id 0 is EOS: special, 0 bytes
    got = bits_per_byte(nats, targets, token_bytes)
    assert (got["tokens"], got["bytes"]) == (3, 6)  # ids 5, 2, 7; the ignored one and EOS are left out of both sums
    assert got["bits_per_byte"] == pytest.approx((1.0 + 2.0 + 4.0) / math.log(2) / 6)


def test_bits_per_byte_of_a_uniform_model_on_a_hand_window():
    """'aé' EOS 'b' in bytes: targets 0xC3, 0xA9 are scored (1 byte each); EOS is special and 'b' is in
    the next document, so bpb = 2 ln V / ln 2 / 2 bytes."""
    tok = Tokenizer.bytes()
    model = tiny_model(vocab_size=257, eos_id=tok.eos_id)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform logits: ln V nats per target
    window = torch.tensor([[97, 0xC3, 0xA9, tok.eos_id, 98]])
    nats, targets = main_head_nats(model, window, tok.eos_id)
    got = bits_per_byte(nats, targets, torch.tensor(tok.token_byte_lengths()))
    assert (got["tokens"], got["bytes"]) == (2, 2)
    assert got["bits_per_byte"] == pytest.approx(math.log2(257), rel=1e-6)


def test_token_bytes_are_utf8_bytes_not_characters():
    text = "def naïve():\n    return 'Grüße ✓ 日本'\n" * 10
    tok = Tokenizer.train_bpe([text], 300)
    lengths = tok.token_byte_lengths()
    ids = tok.encode(text)
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")) != len(text)
    assert lengths[tok.eos_id] == 0


def test_next_line_cases_are_every_eligible_line_evenly_spaced():
    docs = ["a\nb\n\nc", "x\n" + "y" * 200 + "\nz"]
    cases = next_line_cases(docs, 10)
    assert cases == [LineCase(0, 1, "a", "b"), LineCase(0, 3, "a\nb\n", "c"), LineCase(1, 2, "x\n" + "y" * 200, "z")]
    assert next_line_cases(docs, 2) == cases[:2]


def test_exact_line_needs_the_whole_line_and_its_end():
    assert is_exact_line("\n    return x\nfoo", "    return x", ended=False)
    assert is_exact_line("\n    return x", "    return x", ended=True)  # the file ends after the line
    assert not is_exact_line("\n    return x", "    return x", ended=False)  # cut short: x or xy?
    assert not is_exact_line("\n    return x1\n", "    return x", ended=False)
    assert not is_exact_line("\n  return x\n", "    return x", ended=False)  # indentation counts
    assert not is_exact_line("    return x\n", "    return x", ended=False)  # the line break comes first


def test_next_line_exact_match_on_scripted_greedy_output(monkeypatch):
    """generate is replaced by scripted continuations: two hits (one ends at EOS), a wrong line, and a
    right line that overruns its token cap before the newline."""
    tok = Tokenizer.bytes()
    cases = [LineCase(0, 1, "def f():", "    return 1"), LineCase(0, 2, "a\nb", "c"), LineCase(1, 1, "x", "y = 2"),
             LineCase(2, 1, "p", "q")]
    script = {"def f():": "\n    return 1\n\n", "a\nb": "\nc", "x": "\ny = 3\n", "p": "\nq" + "q" * 20 + "\n"}
    seen = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        assert kw["mode"] == "ntp" and kw.get("temperature", 0.0) == 0.0  # plain greedy
        seen.append(prompts)
        out = []
        for p in prompts:
            ids = tok.encode(script[tok.decode(p)])
            out.append((ids + [tok.eos_id] if tok.decode(p) == "a\nb" else ids)[:max_new_tokens])
        return out, None

    monkeypatch.setattr("multitoken.decoding.generate", fake_generate)
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=256))
    got = next_line_exact_match(model, tok, cases, context=64, batch_size=3)
    assert got == {"exact_match": 0.5, "cases": 4, "hits": 2}
    assert [tok.decode(p) for batch in seen for p in batch] == [c.prompt for c in cases]  # prompts end before the newline

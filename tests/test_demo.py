"""The README's main job runs end to end (a few steps here; the real demo trains for minutes)."""

import json

import pytest
import torch

from multitoken.cli import main
from multitoken.data.shards import read_shard
from multitoken.io.checkpoint import load_run
from test_exactness import replay


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    """The demo's completions and tau, checked against decoding done here: plain greedy by full
    forward passes (no cache, no heads) and tau replayed from the drafts its heads make on them;
    the heads' own training left the model it drafts for bit-identical."""
    args = ["demo", "--workdir", str(tmp_path), "--steps", "3", "--head-steps", "2", "--continuations", "32",
            "--max-new-tokens", "8", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["steps"] == 3 and summary["head_steps"] == 2 and len(summary["prompts"]) == 3
    # What the README's figures rely on: where the numbers came from, and the timed step costs.
    assert summary["commit"] and summary["load_before"] and summary["machine"]["cores"]
    assert summary["mean_step_cost"] > 0 and all(p["step_cost"] > 0 for p in summary["prompts"])
    # The text the heads trained on is the model's own greedy continuation of each prefix.
    base, tok = load_run(tmp_path / "run")
    assert summary["own_text"]["continuations"] == 32 and 0 < summary["own_text"]["written"] <= 32 * 128
    ids = read_shard(tmp_path / "own-text" / "train.bin").astype(int).tolist()
    mask = read_shard(tmp_path / "own-text" / "train.mask.bin").astype(int).tolist()
    end = ids.index(tok.eos_id) + 1
    doc, written = ids[:end], [t for t, k in zip(ids[:end], mask[:end]) if k]
    prefix = doc[: mask.index(1)]
    assert doc[: len(prefix) + len(written)] == prefix + written
    with torch.no_grad():
        seq = list(prefix)
        for _ in range(min(4, len(written))):
            seq.append(int(base.logits(base(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
    assert written[:4] == seq[len(prefix):]
    model, tok = load_run(tmp_path / summary["decode_run"])
    assert summary["decode_run"] == "heads-run" and model.config.heads.depth == 4
    assert all(torch.equal(p, model.state_dict()[k]) for k, p in base.state_dict().items() if not k.startswith("mtp."))
    assert not all(torch.equal(p, model.state_dict()[k]) for k, p in base.state_dict().items() if k.startswith("mtp."))
    for p in summary["prompts"]:
        prompt = tok.encode(p["prompt"])
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model.logits(model(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
        assert p["completion"] == tok.decode(seq[len(prompt):])
        steps, taken, accepted = replay(model, prompt, seq[len(prompt):], 8, model.depth,
                                        lambda j, d, logits: d == int(logits.argmax()))
        assert p["tau"] == pytest.approx(taken / steps, rel=1e-12)
        assert p["acceptance_per_position"] == pytest.approx([a / steps for a in accepted], rel=1e-12)
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "heads-run" / "loss.png").is_file()
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses the data, the text and the finished runs
    out = capsys.readouterr().out
    assert "reused the text" in out and out.count("continuing the run found there") == 2


@pytest.mark.slow
def test_smollm2_demo_decodes_exactly_with_the_shipped_heads(tmp_path):
    """`demo --model smollm2`: the shipped heads attach to the real model (their fingerprint matches
    the converted GGUF), every output equals plain greedy decoding (the demo raises otherwise) and
    the heads really draft: random or unloaded heads give tau ~1.0 on code."""
    args = ["demo", "--model", "smollm2", "--workdir", str(tmp_path), "--max-new-tokens", "24", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["heads"] == "sequential:4:shared" and all(p["identical"] for p in summary["prompts"])
    assert summary["dtype"] == "float32" and summary["identical"] == len(summary["prompts"])
    assert {p["kind"] for p in summary["prompts"]} == {"code", "chat"}
    assert summary["mean_tau_code"] > 1.3, summary["mean_tau_code"]
    # transformers' greedy generate on the same float32 weights, timed beside ours, says the same
    assert all(p["transformers_identical"] and p["vs_transformers"] > 0 for p in summary["prompts"] if p["kind"] == "code")


def test_the_step_cost_pairs_steps_of_the_same_bucket():
    """Hand-made run costs: chain:4 is 1.2x plain at 64 live slots and 1.4x at 128; a chain:2
    bucket, a plain-only bucket (256) and a chain-only bucket (512) are left out; median 1.3."""
    from multitoken.demo import paired_step_cost

    s = object()
    runs = {(("plain", False, s), 64): 1.0, (("plain", False, s), 128): 2.0, (("plain", False, s), 256): 9.0,
            (("chain", 4, False, True, s), 64): 1.2, (("chain", 4, False, True, s), 128): 2.8,
            (("chain", 4, False, True, s), 512): 0.1, (("chain", 2, False, True, s), 64): 5.0}
    assert paired_step_cost(runs, 4) == pytest.approx(1.3)
    assert paired_step_cost(runs, 3) is None


def test_compare_reports_where_a_lower_precision_leaves_float32_greedy_decoding():
    """`compare(reference=...)`: each row says whether its plain output equals the reference model's
    and where they first part, checked against greedy decoding by full forward passes (no cache)
    of both models; a reference equal to the model gives identical rows."""
    import copy

    from multitoken.data.tokenizer import Tokenizer
    from multitoken.demo import compare
    from test_speculative import spread_model

    tok = Tokenizer.bytes()
    model = spread_model("medusa", 2, 4, vocab_size=257)
    other = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():  # a reference that agrees for a while (on some prompts), then parts
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 0.01)
    prompts = [("code", t, tok.encode(t)) for t in ("def f(x):\n    ", "import os\n", "class A:")]

    def full(m, ids, n=24):
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(m.logits(m(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
        return seq[len(ids):]

    same = compare(model, prompts, 24, 1, None, None, tok, reference=copy.deepcopy(model))
    assert all(r["float32_identical"] and r["float32_first_divergence"] is None for r in same)
    rows = compare(model, prompts, 24, 1, None, None, tok, reference=other)
    parted = 0
    for (_, _, ids), r in zip(prompts, rows):
        a, b = full(model, ids), full(other, ids)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert r["float32_identical"] == (a == b) and r["float32_first_divergence"] == first
        parted += first is not None
    assert parted == 3, "the perturbed reference parts from the model on every prompt"

"""The README's main job runs end to end (a few steps here; the real demo trains for minutes)."""

import json

import pytest
import torch

from multitoken.cli import main
from multitoken.io.checkpoint import load_run
from test_exactness import replay


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    """The demo's completions and tau, checked against decoding done here: plain greedy by full
    forward passes (no cache, no heads) and tau replayed from the drafts its heads make on them."""
    args = ["demo", "--workdir", str(tmp_path), "--steps", "3", "--max-new-tokens", "8", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["steps"] == 3 and len(summary["prompts"]) == 3
    # What the README's figures rely on: where the numbers came from, and the timed step costs.
    assert summary["commit"] and summary["load_before"] and summary["machine"]["cores"]
    assert summary["mean_step_cost"] > 0 and all(p["step_cost"] > 0 for p in summary["prompts"])
    model, tok = load_run(tmp_path / "run")
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
    assert (tmp_path / "run" / "loss.png").is_file()
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses the data and the finished run
    out = capsys.readouterr().out
    assert "reused" in out and "continuing the run found there" in out


@pytest.mark.slow
def test_smollm2_demo_decodes_exactly_with_the_shipped_heads(tmp_path):
    """`demo --model smollm2`: the shipped heads attach to the real model (their fingerprint matches
    the converted GGUF), every output equals plain greedy decoding (the demo raises otherwise) and
    the heads really draft: random or unloaded heads give tau ~1.0 on code."""
    args = ["demo", "--model", "smollm2", "--workdir", str(tmp_path), "--max-new-tokens", "24", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["heads"] == "sequential:4:shared" and all(p["identical"] for p in summary["prompts"])
    assert {p["kind"] for p in summary["prompts"]} == {"code", "chat"}
    assert summary["mean_tau_code"] > 1.3, summary["mean_tau_code"]
    # transformers' greedy generate on the same float32 weights, timed beside ours, says the same
    assert all(p["transformers_identical"] and p["vs_transformers"] > 0 for p in summary["prompts"] if p["kind"] == "code")

"""Benchmarks' own arithmetic against outside references: the FLOP formula of `bench train`
against torch's FLOP counter, and `bench decode`'s token-match rate."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from multitoken.bench.decode import match_rate
from multitoken.bench.train import train_flops
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model import Transformer
from multitoken.training.loss import MTPLoss


@pytest.mark.parametrize("spec", ["none", "parallel:2", "sequential:2", "medusa:2", "sequential:3:shared", "sequential:3:shared:fused"])
def test_train_flops_equal_torch_flop_counter(spec):
    """One training step's matmul FLOPs as torch counts them (math attention, which the counter sees
    as two batched matmuls over all T x T pairs) equal the formula with causal=False."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64,
                      eos_id=1, heads=HeadsConfig.parse(spec))
    model = Transformer(cfg).train()
    if model.mtp is not None:
        model.mtp.recompute = False  # recomputation is counted apart (torch may stop it early)
    B, T = 2, 64
    window = torch.randint(2, 97, (B, T + 1))
    loss = MTPLoss(model.depth, model.default_loss_weights(), eos_id=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss(model, model(window[:, :-1]), window).loss.backward()
    assert counter.get_total_flops() / (B * T) == pytest.approx(train_flops(model, T, causal=False)["model"], rel=1e-9)


def test_recompute_flops_bound_what_torch_recomputes():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64,
                      eos_id=1, heads=HeadsConfig.parse("parallel:2"))
    model = Transformer(cfg).train()
    window = torch.randint(2, 97, (2, 65))
    loss = MTPLoss(2, [1.0, 1.0, 1.0], eos_id=1)
    counts = []
    for recompute in (False, True):
        model.mtp.recompute = recompute
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss(model, model(window[:, :-1]), window).loss.backward()
        counts.append(counter.get_total_flops() / 128)
    extra = counts[1] - counts[0]
    f = train_flops(model, 64, causal=False)
    assert 0.8 * f["recompute"] <= extra <= f["recompute"]  # the head blocks' matmuls, at most their attention too


def test_match_rate_counts_tokens_before_the_first_divergence():
    assert match_rate([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == (1.0, None)
    assert match_rate([[1, 9, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == (4 / 6, 1)
    assert match_rate([[1, 2], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == (5 / 6, 2)


def test_relative_step_costs_compare_with_the_plain_step_of_the_same_temperature_and_bucket():
    from multitoken.bench.decode import relative_step_costs

    rows = [dict(step="plain", detail="", temperature=0.0, live=128, seconds=1.0),
            dict(step="plain", detail="", temperature=1.0, live=128, seconds=2.0),
            dict(step="chain", detail="3", temperature=0.0, live=128, seconds=1.2),
            dict(step="chain", detail="3", temperature=1.0, live=128, seconds=2.6),
            dict(step="tree", detail="t", temperature=0.0, live=256, seconds=9.0)]  # no plain step at 256: left out
    assert relative_step_costs({1: rows}) == {1: {"chain:3@128,T=0": pytest.approx(1.2), "chain:3@128,T=1": pytest.approx(1.3)}}


def test_head_training_bench_runs_every_option_on_a_tiny_shape():
    from multitoken.bench.head_train import run_matrix

    rows = run_matrix([dict(distill=True, teacher="per_depth"), dict(distill=True), dict(distill=True, ttt=True),
                       dict(distill=False, chunk_rows=16)], progress=False, preset="tiny", heads="sequential:2",
                      batch_size=2, seq_len=16, steps=2, warmup=1, device="cpu", overrides=dict(vocab_size=97))
    assert len(rows) == 4 and rows[0]["vs_first"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["kernel"] == "chunked" for r in rows)


def test_distillation_baseline_has_the_gradient_of_the_kl():
    """The bench's baseline (the teacher recomputed per depth, a cross-entropy to it) and the KL
    with the teacher once differ by the teacher's entropy only: the same gradients."""
    from multitoken.bench.head_train import per_depth_teacher_loss
    from multitoken.training.loss import Targets

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64,
                      eos_id=1, heads=HeadsConfig.parse("sequential:3"))
    model = Transformer(cfg)
    model.freeze_backbone()
    w = torch.randint(2, 97, (2, 21))
    t = Targets.build(w, 3, 1)
    grads = []
    for old in (True, False):
        h = model(w[:, :-1])
        loss = (per_depth_teacher_loss(model, h, t, [1.0] * 4, chunk_rows=7) if old else
                MTPLoss(3, [1.0] * 4, eos_id=1, distill=True, skip_main=True, chunk_rows=7)(model, h, w, targets=t).loss)
        ps = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, ps))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_the_reference_decoder_decodes_greedily_like_full_forward_passes():
    """bench decode's reference line (a minimal static-cache decoder on our weights) is greedy
    decoding: equal to re-running the whole sequence without a cache at every token."""
    from multitoken.bench.reference import MinimalDecoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64, eos_id=1)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.15)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    want = []
    for pr in prompts:
        seq = list(pr)
        for _ in range(16):
            seq.append(int(model.logits(model(torch.tensor([seq]))[0][0, -1]).argmax()))
        want.append(seq[len(pr):])
    assert MinimalDecoder(model, 3, slots=64).generate(prompts, 16) == want


def test_bench_decode_runs_the_reference_and_each_draft_vocabulary_on_the_cpu(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    import multitoken

    from multitoken.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "decode", "--preset", "tiny", "--heads", "parallel:2", "--batch", "1", "--temperature", "0",
                 "--draft-vocab", "64,full", "--new-tokens", "6", "--prompt-tokens", "8", "--repeats", "1",
                 "--no-transformers", "--no-eager", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "decode.json").read_text())
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(multitoken.__file__).parent, capture_output=True, text=True)
    if here.returncode == 0:  # a checkout: the JSON names its commit
        assert data["commit"].split("+")[0] == here.stdout.strip()
    rows = {r["method"]: r for r in data["results"]}
    assert rows["reference: minimal decoder (eager)"]["token_match"] == 1.0
    for v in ("64", "full"):
        r = rows[f"ours chain V'={v}"]
        assert r["token_match"] == 1.0 and r["draft_vocab"] == v and set(r["draft_cost_s"]) == {"1", "2"}
    assert main(["bench", "decode", "--preset", "tiny", "--heads", "parallel:2", "--draft-vocab", "5000",
                 "--no-transformers", "--device", "cpu", "--out", str(tmp_path / "b2")]) == 2


def test_width_deviation_is_zero_in_float32_on_the_cpu_and_sees_a_planted_drift():
    """bench decode's bf16 diagnostic: teacher-forced passes of each width against one-token steps."""
    from multitoken.bench.numerics import width_deviation

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64, eos_id=1)
    model = Transformer(cfg).eval()
    tokens = torch.randint(2, 61, (40,)).tolist()
    rows = width_deviation(model, tokens, [5, 16])
    assert [r["width"] for r in rows] == [1, 5, 16] and all(r["positions"] == 24 for r in rows)
    assert all(r["max_abs_logit_diff"] < 1e-4 and r["argmax_flips"] == 0 for r in rows)
    # A model whose output depends on the pass width (planted): the diagnostic must show it.
    forward = model.forward
    model.forward = lambda idx, **kw: [h + 0.5 * (idx.shape[1] > 1) for h in forward(idx, **kw)]
    assert width_deviation(model, tokens, [5])[1]["max_abs_logit_diff"] > 0.1


def test_transformers_peer_of_fused_heads_is_the_backbone_alone():
    """The export refuses fused heads (no place for fc): `bench decode --transformers` then compares
    against transformers running our backbone, with the same logits, and without use_mtp."""
    pytest.importorskip("transformers")
    from conftest import FUSED, tiny_model

    from multitoken.bench.decode import hf_peer

    model = tiny_model(FUSED, 2).eval()
    hf = hf_peer(model, None, "cpu", torch.float32)
    assert hf is not None and not getattr(hf.config, "num_mtp_layers", None)
    x = torch.randint(2, 61, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.logits(model(x, heads=False)[0]), atol=1e-5, rtol=1e-5)


def test_a_prompt_set_reports_tau_and_acceptance_over_every_group_not_the_last():
    """bench decode decodes a set group by group; its tau and acceptance come from the summed counts
    (hand-computed here), never from the last group alone nor from an average of the ratios."""
    from multitoken.bench.decode import decode_groups
    from multitoken.decoding.api import GenerationStats

    parts = {  # per group: tokens emitted by steps, row steps, drafted and accepted per position
        1: GenerationStats(mode="spec", draft=2, batch_size=1, new_tokens=21, steps=10, row_steps=10, step_tokens=20,
                           drafted=[10, 10], accepted=[8, 2], chosen_draft=[2], wall_time_s=1.0),
        2: GenerationStats(mode="spec", draft=2, batch_size=1, new_tokens=11, steps=10, row_steps=10, step_tokens=10,
                           drafted=[10, 10], accepted=[0, 0], chosen_draft=[2, 0], wall_time_s=3.0),
    }

    def fake_generate(model, g, new_tokens, **kw):
        return [[0] * parts[g[0][0]].new_tokens], parts[g[0][0]]

    out, st = decode_groups(fake_generate, None, [[[1]], [[2]]], 8, 0.0, {})
    assert [len(o) for o in out] == [21, 11]
    assert st.tau == 30 / 20 and st.acceptance_per_position == [8 / 20, 2 / 20]
    assert (st.new_tokens, st.row_steps, st.tokens_per_second, st.chosen_draft) == (32, 20, 32 / 4.0, [2, 0])


def test_bench_decode_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """A bench run killed at a time limit (the GPU scripts' `timeout`) must leave the rows it had
    measured in decode.json, marked incomplete, instead of nothing."""
    import json

    import pytest

    from multitoken.bench import decode
    from multitoken.cli import main

    real, calls = decode.ours_row, []

    def dies_on_the_third(*a, **kw):
        calls.append(a[4])
        if len(calls) == 3:
            raise SystemExit(137)  # what a kill looks like from inside: nothing after this line runs
        return real(*a, **kw)

    monkeypatch.setattr(decode, "ours_row", dies_on_the_third)
    out = tmp_path / "bench"
    with pytest.raises(SystemExit):  # like a kill, nothing after the raise runs (main lets SystemExit through)
        main(["bench", "decode", "--preset", "tiny", "--heads", "parallel:2", "--batch", "1", "--temperature", "0",
              "--new-tokens", "4", "--prompt-tokens", "8", "--repeats", "1", "--no-transformers", "--no-eager",
              "--no-reference", "--device", "cpu", "--out", str(out)])
    data = json.loads((out / "decode.json").read_text())
    assert data["complete"] is False and [r["method"] for r in data["results"]] == calls[:2]


def test_the_automatic_length_is_compared_with_the_best_fixed_chain(tmp_path):
    """--chain-drafts 1,2 adds fixed chains of 1 and 2 drafts beside the full one (3); the auto row's
    vs_best_fixed is its speed over the fastest of the three, recomputed here from the rows."""
    import json

    from multitoken.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "decode", "--preset", "tiny", "--heads", "parallel:3", "--batch", "1", "--temperature", "0",
                 "--chain-drafts", "1,2,3,9", "--new-tokens", "6", "--prompt-tokens", "8", "--repeats", "1",
                 "--no-transformers", "--no-eager", "--no-reference", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "decode.json").read_text())["results"]}
    fixed = {m: rows[m] for m in ("ours chain:1", "ours chain:2", "ours chain")}
    assert "ours chain:3" not in rows and "ours chain:9" not in rows  # the full depth runs once, deeper ones not at all
    assert all(r["token_match"] == 1.0 for r in fixed.values())
    assert rows["ours chain:1"]["chosen_draft"] == [1] and rows["ours chain:2"]["chosen_draft"] == [2]
    best = max(fixed, key=lambda m: fixed[m]["tokens_per_s"])
    auto = rows["ours chain auto"]
    assert auto["best_fixed"] == best
    assert auto["vs_best_fixed"] == pytest.approx(auto["tokens_per_s"] / fixed[best]["tokens_per_s"])


def test_the_automatic_length_is_never_its_own_best_fixed_chain():
    """Rows by hand where the automatic length and a reduced-vocabulary chain are faster than every
    fixed chain: vs_best_fixed is over the fastest fixed chain (chain:2 here), above 1, and rows of
    other methods get nothing."""
    from multitoken.bench.decode import compare_auto_with_fixed

    rows = [dict(method="ours plain", tokens_per_s=100.0), dict(method="ours chain:1", tokens_per_s=150.0),
            dict(method="ours chain:2", tokens_per_s=180.0), dict(method="ours chain", tokens_per_s=170.0),
            dict(method="ours chain auto", tokens_per_s=198.0), dict(method="ours chain V'=4096", tokens_per_s=240.0)]
    compare_auto_with_fixed(rows)
    auto = rows[4]
    assert auto["best_fixed"] == "ours chain:2" and auto["vs_best_fixed"] == pytest.approx(1.1)
    assert all("vs_best_fixed" not in r for r in rows if r is not auto)
    alone = [dict(method="ours chain auto", tokens_per_s=198.0)]
    compare_auto_with_fixed(alone)  # no fixed chain run: nothing to compare with
    assert "vs_best_fixed" not in alone[0]

"""Retrofitting heads on a frozen backbone from features computed once: the stored states give
the same hidden states as a full forward pass, training moves only the heads, and the CLI writes
a run that loads."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_config, tiny_model
from multitoken.cli import main as cli_main
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run, save_run
from multitoken.model import Transformer
from multitoken.training.retrofit import FeatureSet, add_heads, backbone_features, fit_heads, hiddens_from_features, precompute_features


@pytest.mark.parametrize("kind", FAMILIES)
def test_hidden_states_from_features_equal_the_full_forward(kind):
    model = tiny_model(kind, 2).eval()
    window = torch.randint(2, 61, (2, 13))
    with torch.no_grad():
        want = model(window[:, :-1])
        feats = backbone_features(model, window[:, :-1], model.trunk_layers())
        got = hiddens_from_features(model, window, feats, model.trunk_layers())
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


@pytest.fixture
def pretrained(tmp_path):
    """A tiny 'pretrained' byte-level run and a DATA_DIR prepared with its tokenizer."""
    from multitoken.data.prepare import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text("".join(f"def f{j}(x):\n    return x + {j * i}\n\n" for j in range(30)))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64, eos_id=256)
    save_run(tmp_path / "base", Transformer(cfg), Tokenizer.bytes())
    prepare(str(corpus), str(tmp_path / "base"), tmp_path / "data", val_fraction=0.2, progress=False)
    return tmp_path / "base", tmp_path / "data"


def test_features_are_stored_once_and_fitting_moves_only_the_heads(pretrained, tmp_path):
    base, data = pretrained
    meta = precompute_features(base, data, tmp_path / "feat", 2, seq_len=32, max_tokens=32 * 20, batch_size=4,
                               shard_windows=8, progress=False)
    assert meta["windows"] == 20 and meta["shards"] == 3 and meta["tokens"] == 640
    again = precompute_features(base, data, tmp_path / "feat", 2, seq_len=32, max_tokens=32 * 20, progress=False)
    assert again["seconds"] == meta["seconds"]  # reused, not recomputed
    with pytest.raises(UserError, match="other settings"):
        precompute_features(base, data, tmp_path / "feat", 1, seq_len=32, max_tokens=640, progress=False)

    fs = FeatureSet(tmp_path / "feat")
    assert fs.tokens.shape == (20, 33) and fs.features.shape == (20, 32, 32) and fs.features.dtype == torch.bfloat16
    model, _ = add_heads(base, HeadsConfig("medusa", 2))
    with torch.no_grad():  # stored states are the backbone's (up to bf16 rounding)
        torch.testing.assert_close(fs.features[:2].float(), backbone_features(model, fs.tokens[:2, :-1], 2), atol=0.05, rtol=0.02)
    backbone = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    heads = {n: p.clone() for n, p in model.named_parameters() if n.startswith("mtp.")}
    log = fit_heads(model, fs, steps=30, batch_size=4, lr=3e-3, log_every=5, progress=False)
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if n in backbone)
    assert any(not torch.equal(p, heads[n]) for n, p in model.named_parameters() if n in heads)
    first, last = log[0]["loss_per_depth"], log[-1]["loss_per_depth"]
    assert last[1] < first[1] and last[2] < first[2]  # the distillation loss of both heads went down


def test_retrofit_cli_writes_a_run_with_heads(pretrained, tmp_path, capsys):
    base, data = pretrained
    rc = cli_main(["retrofit", "--init", str(base), "--data", str(data), "--heads", "sequential:1", "--out", str(tmp_path / "run"),
                   "--tokens", "320", "--seq-len", "32", "--steps", "3", "--batch-size", "2", "--eval-batches", "1", "--quiet"])
    assert rc == 0 and "expected tau" in capsys.readouterr().out
    model, tok = load_run(tmp_path / "run")
    assert model.config.heads == HeadsConfig("sequential", 1) and tok.eos_id == 256
    base_model, _ = load_run(base)
    assert all(torch.equal(base_model.state_dict()[k], v) for k, v in model.state_dict().items() if not k.startswith("mtp."))
    assert cli_main(["retrofit", "--init", str(tmp_path / "run"), "--data", str(data), "--heads", "medusa:1",
                     "--out", str(tmp_path / "run2")]) == 2  # already has heads: one-line error


@pytest.mark.parametrize("kind", ["sequential:shared", "medusa"])
def test_heads_saved_alone_attach_to_their_backbone_and_refuse_another(tmp_path, kind):
    """Heads written alone (bf16) and attached to the plain run they were trained on give the trained
    model's outputs at every depth (its heads rounded to bf16, an outside reference built here);
    attached to another backbone, or read from a file that is not a heads file, one line says why."""
    from multitoken.io.hf import build_model
    from multitoken.io.heads_file import attach_heads, heads_info, save_heads

    model = tiny_model(kind, 3, seed=1).eval()
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.normal_(0, 0.2)
    plain = tiny_model("none", 0, seed=1)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    save_run(tmp_path / "base", plain, Tokenizer.bytes())
    path = save_heads(model, tmp_path / "heads.safetensors", {"trained": "here"})
    assert heads_info(path)["heads"] == str(model.config.heads) and heads_info(path)["info"] == {"trained": "here"}

    got, _ = attach_heads(tmp_path / "base", path)
    rounded = build_model(model.config, {k: (v.to(torch.bfloat16) if k.startswith("mtp.") else v)
                                         for k, v in model.state_dict().items()}, fresh_heads=False)
    x = torch.randint(2, 61, (2, 9))
    with torch.no_grad():
        for a, b in zip(got(x), rounded(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert got.config.heads == model.config.heads

    other = tiny_model("none", 0, seed=2)
    save_run(tmp_path / "other", other, Tokenizer.bytes())
    with pytest.raises(UserError, match="trained on another model"):
        attach_heads(tmp_path / "other", path)
    with pytest.raises(UserError, match="not a multitoken heads file"):
        attach_heads(tmp_path / "base", tmp_path / "base" / "model.safetensors")


def test_heads_files_with_damaged_metadata_or_other_tensors_are_one_line_errors(tmp_path):
    """A heads file whose spec does not parse, or whose tensors are not those its spec builds, is
    refused in one line naming the file (before, an int() traceback or an assertion deep inside)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from multitoken.io.heads_file import attach_heads, save_heads

    model = tiny_model("sequential:shared", 2, seed=1)
    plain = tiny_model("none", 0, seed=1)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    save_run(tmp_path / "base", plain, Tokenizer.bytes())
    path = save_heads(model, tmp_path / "heads.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}

    def rewrite(name, meta_over=None, drop=None):
        out = tmp_path / name
        save_file({k: v for k, v in tensors.items() if k != drop}, out, metadata={**meta, **(meta_over or {})})
        return out

    for bad in (rewrite("spec.safetensors", {"heads": "sequential:two"}), rewrite("layers.safetensors", {"medusa_layers": "x"}),
                rewrite("fused.safetensors", {"fused_layers": "x"})):
        with pytest.raises(UserError, match="damaged metadata.*save_heads"):
            attach_heads(tmp_path / "base", bad)
    for bad in (rewrite("depth.safetensors", {"heads": "sequential:2"}),  # unshared: two modules' tensors expected
                rewrite("missing.safetensors", drop=next(iter(tensors)))):
        with pytest.raises(UserError, match="tensors are not those of"):
            attach_heads(tmp_path / "base", bad)


# ---- fused heads: files, warm starts, and what retrofit cannot store --------------------------------------
def _base_and(tmp_path, kind: str, depth: int, seed: int = 1, **heads_over):
    """A model with random heads of `kind` (HeadsConfig fields overridden by heads_over) and its plain
    backbone saved as tmp_path/base."""
    import dataclasses

    cfg = tiny_config(kind, depth)
    torch.manual_seed(seed)
    model = Transformer(cfg.with_heads(dataclasses.replace(cfg.heads, **heads_over)))
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.normal_(0, 0.2)
    plain = tiny_model("none", 0, seed=seed)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    save_run(tmp_path / "base", plain, Tokenizer.bytes())
    return model.eval(), plain


def test_fused_heads_files_and_runs_round_trip_with_their_layers(tmp_path):
    """Fused heads on layers other than the default ones ([1, 3], not [0, 1, 3]) come back from a heads
    file and from a run directory with the same layers and the same outputs at every depth."""
    from multitoken.io.heads_file import attach_heads, heads_info, save_heads
    from multitoken.io.hf import build_model

    model, _ = _base_and(tmp_path, "sequential:shared", 2, fused=True, fused_layers=[1, 3])
    path = save_heads(model, tmp_path / "fused.safetensors")
    assert heads_info(path)["heads"] == "sequential:2:shared:fused" and heads_info(path)["fused_layers"] == "1,3"
    got, _ = attach_heads(tmp_path / "base", path)
    assert got.config.heads == model.config.heads
    rounded = build_model(model.config, {k: (v.to(torch.bfloat16) if k.startswith("mtp.") else v)
                                         for k, v in model.state_dict().items()}, fresh_heads=False)
    save_run(tmp_path / "run", model, Tokenizer.bytes())
    again, _ = load_run(tmp_path / "run")
    assert again.config == model.config
    x = torch.randint(2, 61, (2, 9))
    with torch.no_grad():
        for a, b, c, d in zip(got(x), rounded(x), again(x), model(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(c, d, atol=0, rtol=0)


def test_ordinary_heads_warm_start_fused_ones_exactly_and_other_files_are_refused(tmp_path, caplog):
    """`train --init-heads` with an ordinary heads file for fused heads: every weight of the file is
    copied and fc starts as h^0 alone, so at step 0 every depth's logits equal the ordinary heads'
    (attached to the same backbone), bit for bit; one log line says so. A fused file for ordinary
    heads, or ordinary heads of another spec, stay one-line errors."""
    import logging

    from multitoken.io.heads_file import attach_heads, load_heads_into, save_heads
    from multitoken.training.trainer import load_backbone

    ordinary, _ = _base_and(tmp_path, "sequential:shared", 3)
    path = save_heads(ordinary, tmp_path / "ordinary.safetensors")
    want, _ = attach_heads(tmp_path / "base", path)
    fused = Transformer(ordinary.config.with_heads(HeadsConfig.parse("sequential:3:shared:fused")))
    load_backbone(fused, tmp_path / "base")
    with torch.no_grad():
        fused.mtp.fc.weight.normal_()  # whatever fc held, the warm start sets it
    with caplog.at_level(logging.INFO, logger="multitoken.io.heads_file"):
        note = load_heads_into(fused, path)
    assert "fc (states after blocks 0, 1, 3) starts as h^0 alone" in note and note in caplog.text
    x = torch.randint(2, 61, (2, 10))
    with torch.no_grad():
        for k, (a, b) in enumerate(zip(fused.eval()(x), want(x))):
            torch.testing.assert_close(fused.logits(a, k), want.logits(b, k), atol=0, rtol=0)

    fused_file = save_heads(fused, tmp_path / "fused.safetensors")
    plain_heads = Transformer(ordinary.config)
    load_backbone(plain_heads, tmp_path / "base")
    with pytest.raises(UserError, match="holds sequential:3:shared:fused heads, this run trains sequential:3:shared:") as e:
        load_heads_into(plain_heads, fused_file)
    other = Transformer(ordinary.config.with_heads(HeadsConfig.parse("sequential:2:shared:fused")))
    load_backbone(other, tmp_path / "base")
    with pytest.raises(UserError, match="holds sequential:3:shared heads, this run trains sequential:2:shared:fused"):
        load_heads_into(other, path)
    assert "\n" not in str(e.value)


def test_train_warm_starts_fused_heads_from_an_ordinary_heads_file(pretrained, tmp_path, caplog):
    import logging

    from multitoken.config import TrainConfig
    from multitoken.io.heads_file import save_heads
    from multitoken.training.trainer import train

    base, data = pretrained
    donor, _ = add_heads(base, HeadsConfig.parse("sequential:2:shared"))
    path = save_heads(donor, tmp_path / "ordinary.safetensors")
    cfg = TrainConfig(heads="sequential:2:shared:fused", init=str(base), init_heads=str(path), freeze_backbone=True, distill=True,
                      steps=2, batch_size=2, seq_len=32, eval_every=0, save_every=0, log_every=1, eval_batches=1, device="cpu")
    with caplog.at_level(logging.INFO):
        out = train(cfg, data, tmp_path / "run", progress=False)
    assert out["step"] == 2 and "fc (states after blocks 0, 1, 2) starts as h^0 alone" in caplog.text
    model, _ = load_run(tmp_path / "run")
    assert model.config.heads.fused_layers == [0, 1, 2]


def test_retrofit_refuses_heads_that_read_states_its_features_do_not_hold(pretrained, tmp_path):
    """Stored features hold the state after the cut alone: fused heads are refused in one line, before
    anything is computed, naming the training command that serves them."""
    from multitoken.training.retrofit import retrofit

    base, data = pretrained
    with pytest.raises(UserError, match=r"read the backbone's states after blocks 0, 1, .*multitoken train --init RUN") as e:
        retrofit(base, data, HeadsConfig.parse("sequential:1:fused"), tmp_path / "out", tokens=320, seq_len=32, batch_size=2,
                 steps=1, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "features").exists()
    model, _ = add_heads(base, HeadsConfig.parse("sequential:1:fused"))
    precompute_features(base, data, tmp_path / "feat", 2, seq_len=32, max_tokens=320, batch_size=2, progress=False)
    with pytest.raises(UserError, match="retrofit features hold only the state after block 2"):
        fit_heads(model, FeatureSet(tmp_path / "feat"), steps=1, batch_size=2, progress=False)

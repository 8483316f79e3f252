"""Fast tests for bugs that once survived the suite (issue 22's planted bugs), each against an
outside reference: a hand formula, a hand count, a hand-computed distribution, or the files on disk.

1 dynamic tree invariant on one-hot drafts; 2 LR warmup values; 3 grad accumulation 1 vs 2;
4 checkpoint fallback never newer than the pointer; 5 tie_word_embeddings default; 6 Qwen2
sliding window only when in use; 7 heads-file fingerprint covers the final norm; 8 loader resume
across an epoch; 9 loader window count by hand; 10 retrofit distils; 11 a lambda schedule
boundary crossed in training. Then fast versions of four slow-only catches: the checkpoint
pointer written last, the tokenizer fingerprint's strength, a chained shard CRC, DDP no_sync.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multitoken.data.loader import TokenLoader
from multitoken.data.shards import write_shard
from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


def records(run: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ---- 1: the dynamic tree -----------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [2, 3, 4, 6, 9])
def test_dynamic_tree_keeps_parents_with_confident_one_hot_drafts(nodes):
    """With p = 1 at every depth a child ties its parent's score; the tree must still hold each
    node's parent (depth[i] == depth[parent[i]] + 1, parent selected and earlier)."""
    from multitoken.decoding.trees import dynamic_nodes

    k, V = 4, 11
    lq = torch.full((2, k, V), -30.0)
    for d in range(k):
        lq[0, d, (3 + d) % V] = 30.0  # one-hot, confident
        lq[1, d, (7 * d + 1) % V] = 30.0
    tokens, parent, depth = dynamic_nodes(torch.tensor([1, 2]), lq, nodes, width=3)
    for b in range(2):
        assert parent[b, 0] == 0 and depth[b, 0] == 0
        for i in range(1, nodes):
            assert parent[b, i] < i
            assert depth[b, i] == depth[b, parent[b, i]] + 1, (b, i, parent[b].tolist(), depth[b].tolist())
    # the chain of certain tokens is kept first: one node per depth 1..chain holds that head's token
    chain = min(nodes - 1, k)
    kept = set(zip(depth[0].tolist(), tokens[0].tolist()))
    assert {(d + 1, (3 + d) % V) for d in range(chain)} <= kept


# ---- 2, 3, 11: the training loop against hand formulas -------------------------------------------


def hand_lr(j: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Step j (0-based): (j+1)/warmup of lr while warming up, then half a cosine down to min_lr at `steps`."""
    if j < warmup:
        return lr * (j + 1) / warmup
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, (j - warmup) / (steps - warmup)))) / 2


def test_logged_learning_rates_follow_warmup_then_cosine(data, tmp_path):
    from multitoken.training.trainer import train

    cfg = tiny_train_config(steps=7, warmup=3, lr=1e-2, min_lr=1e-3)
    train(cfg, data, tmp_path / "run", progress=False)
    got = [r["lr"] for r in records(tmp_path / "run")]
    assert got == pytest.approx([hand_lr(j, 1e-2, 1e-3, 3, 7) for j in range(7)], rel=1e-12)


def test_grad_accumulation_keeps_the_step_of_the_whole_batch(data, tmp_path):
    """Accumulating 2 micro-batches of 2 rows is one step on 4 rows: the same gradient norm."""
    from multitoken.training.trainer import train

    for accum in (1, 2):
        train(tiny_train_config(steps=2, grad_accum=accum), data, tmp_path / f"a{accum}", progress=False)
    one, two = ([r["grad_norm"] for r in records(tmp_path / f"a{a}")] for a in (1, 2))
    assert two == pytest.approx(one, rel=1e-4)
    assert [r["loss"] for r in records(tmp_path / "a2")] == pytest.approx([r["loss"] for r in records(tmp_path / "a1")], rel=1e-5)


def test_a_lambda_schedule_switches_at_its_step(data, tmp_path, monkeypatch):
    """--mtp-lambda 0.3,0.06@2 with 2 parallel heads: optimizer steps 0 and 1 weigh each head 0.15,
    steps 2 on 0.03; the weights that reach the loss and the logged totals both say so."""
    from multitoken.training import trainer

    used: list[list[float]] = []
    real = trainer.global_depth_weights

    def spy(base, *rest):  # the base weights of this step, whatever else the loop passes
        used.append([float(w) for w in base])
        return real(base, *rest)

    monkeypatch.setattr(trainer, "global_depth_weights", spy)
    cfg = tiny_train_config(steps=4, loss_weights="lambda", mtp_lambda="0.3,0.06@2")
    trainer.train(cfg, data, tmp_path / "run", progress=False)
    lam = [0.3, 0.3, 0.06, 0.06]
    assert used == [pytest.approx([1.0, lam[j] / 2, lam[j] / 2]) for j in range(4)]
    for r in records(tmp_path / "run"):
        main, *rest = r["loss_per_depth"]
        assert r["loss"] == pytest.approx(main + lam[r["step"] - 1] / 2 * sum(rest), rel=1e-9)


# ---- 4: checkpoint fallback ---------------------------------------------------------------------


def _save(run: Path, step: int) -> None:
    ckpt.save_checkpoint(run, step, {"w": torch.full((2,), float(step))}, None, {"torch": torch.get_rng_state()}, {},
                         keep=10)


def test_fallback_never_picks_a_checkpoint_newer_than_the_pointer(tmp_path):
    """Steps 2, 4 and 6 on disk, the pointer at 4 (6 was written but the pointer never moved: a
    kill), 4 damaged: the resume is from 2, never from the unconfirmed 6."""
    run = tmp_path / "run"
    for s in (2, 4, 6):
        _save(run, s)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "dir": "step_00000004"}))
    (run / "checkpoints" / "step_00000004" / "rng.safetensors").write_bytes(b"torn")
    warned: list[str] = []
    loaded = ckpt.load_latest_checkpoint(run, warned.append)
    assert loaded["folder"].name == "step_00000002" and torch.equal(loaded["weights"]["w"], torch.full((2,), 2.0))
    assert len(warned) == 1


# ---- 5, 6: Hugging Face configs -----------------------------------------------------------------

HF = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
      "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "eos_token_id": 2}


def test_tie_word_embeddings_defaults_to_untied_as_in_transformers():
    from transformers import LlamaConfig

    from multitoken.io.hf import config_from_hf

    assert LlamaConfig(**HF).tie_word_embeddings is False  # the outside reference
    assert config_from_hf(dict(HF)).tie_embeddings is False
    assert config_from_hf({**HF, "tie_word_embeddings": True}).tie_embeddings is True


def test_qwen2_sliding_window_caps_the_context_only_when_in_use():
    from multitoken.io.hf import config_from_hf

    qwen = {**HF, "model_type": "qwen2", "sliding_window": 16, "max_window_layers": 0}  # every layer may slide
    off = config_from_hf({**qwen, "use_sliding_window": False})  # window smaller than the context, not in use
    assert off.max_seq_len == 64 and off.sliding_window == 0
    on = config_from_hf({**qwen, "use_sliding_window": True})
    assert on.max_seq_len == 16 or on.sliding_window == 16


# ---- 7: the heads file's backbone fingerprint ------------------------------------------------------


def test_heads_fingerprint_tells_backbones_apart_by_their_final_norm():
    from conftest import tiny_model

    from multitoken.io.heads_file import backbone_fingerprint

    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    with torch.no_grad():
        b.norm.weight[3] += 0.5  # everything else identical
    assert backbone_fingerprint(a) != backbone_fingerprint(b)
    c = tiny_model(seed=0)
    with torch.no_grad():
        c.embed_tokens.weight[5, 0] += 0.5
    assert backbone_fingerprint(a) != backbone_fingerprint(c)


# ---- 8, 9: the data loader -------------------------------------------------------------------------


def _shard(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"s{n}.bin"
    write_shard(path, np.arange(n) % 60000, 60000)
    return path


def test_loader_resume_across_an_epoch_boundary(tmp_path):
    """Stop inside epoch 1 (after crossing from epoch 0), resume: the same batches as never stopping."""
    path = _shard(tmp_path, 300)
    full = TokenLoader(path, batch_size=3, seq_len=16, seed=4)
    per_epoch = len(full._starts(0))
    cut_after = per_epoch // 3 + 2  # batches of 3 rows: this is past the end of epoch 0
    ref = [next(full) for _ in range(cut_after + 6)]
    first = TokenLoader(path, batch_size=3, seq_len=16, seed=4)
    for _ in range(cut_after):
        next(first)
    state = first.state_dict()
    assert state["epoch"] >= 1
    again = TokenLoader(path, batch_size=3, seq_len=16, seed=4)
    again.load_state_dict(json.loads(json.dumps(state)))
    for want in ref[cut_after:]:
        assert torch.equal(next(again), want)


@pytest.mark.parametrize("n", [18, 33, 34, 35, 49, 50, 51, 64, 65, 66, 97, 130, 257])
@pytest.mark.parametrize("seed", [0, 1, 5])
def test_loader_windows_per_epoch_match_a_hand_count(n, seed, tmp_path):
    """Each epoch's windows (seq_len + 1 tokens) start at phase, phase + T, ...: all that fit, each once."""
    T = 16
    loader = TokenLoader(_shard(tmp_path, n), batch_size=1, seq_len=T, seed=seed)
    for epoch in range(3):
        starts = sorted(loader._starts(epoch).tolist())
        phase = starts[0]
        hand = sum(1 for s in range(phase, n, T) if s + T + 1 <= n)  # windows from the phase that fit
        assert starts == [phase + i * T for i in range(hand)], (n, seed, epoch, phase)
        assert 0 <= phase < T and starts[-1] + T + 1 <= n


# ---- 10: retrofit distils ------------------------------------------------------------------------


def test_retrofit_trains_heads_on_the_teachers_distribution(tmp_path):
    """The first fit step's per-depth loss is the KL divergence from the backbone's own next-token
    distribution k positions later (computed here by hand), not the data tokens' CE."""
    from multitoken import HeadsConfig, ModelConfig
    from multitoken.data.prepare import prepare
    from multitoken.data.tokenizer import Tokenizer
    from multitoken.io.checkpoint import save_run
    from multitoken.model import Transformer
    from multitoken.training.loss import IGNORE_INDEX, shift_targets
    from multitoken.training.retrofit import FeatureSet, add_heads, fit_heads, hiddens_from_features, precompute_features

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("".join(f"x{j * i % 7} = {j}\n" for j in range(40)) for i in range(8)))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64,
                      eos_id=256)
    save_run(tmp_path / "base", Transformer(cfg), Tokenizer.bytes())
    prepare(str(corpus), str(tmp_path / "base"), tmp_path / "data", val_fraction=0.2, progress=False)
    precompute_features(tmp_path / "base", tmp_path / "data", tmp_path / "feat", 2, seq_len=16, max_tokens=16 * 8,
                        batch_size=4, progress=False)
    fs = FeatureSet(tmp_path / "feat")
    model, _ = add_heads(tmp_path / "base", HeadsConfig("medusa", 2))
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.normal_(0, 0.3)  # heads that disagree with the teacher
    window, feats = fs.tokens.long(), fs.features.float()
    with torch.no_grad():
        hs = hiddens_from_features(model.eval(), window, feats, fs.cut)
        logp = F.log_softmax(model.logits(hs[0]).double(), -1)  # (B, T, V) the teacher
        teacher = logp.exp()
        hand, plain = [], []
        for k in (1, 2):
            logq = F.log_softmax(model.logits(hs[k], k).double(), -1)
            valid = shift_targets(window, k, 256) != IGNORE_INDEX  # same document, inside the window
            # position i learns the teacher at i + k: KL(teacher || head), reported as the loss
            soft = (teacher[:, k:] * (logp[:, k:] - logq[:, :-k])).sum(-1)
            hand.append(soft[valid[:, :-k]].mean().item())
            tgt = shift_targets(window, k, 256)
            plain.append(F.nll_loss(logq.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX).item())
    log = fit_heads(model, fs, steps=1, batch_size=len(fs), lr=1e-3, log_every=1, progress=False)
    got = log[0]["loss_per_depth"][1:]
    assert got == pytest.approx(hand, rel=1e-5)
    assert all(abs(g - p) > 0.01 * p for g, p in zip(got, plain))  # and not the data tokens' CE (2-10% apart here)


# ---- fast versions of four slow-only catches --------------------------------------------------------


def test_the_latest_pointer_is_written_after_every_file_it_names(tmp_path, monkeypatch):
    from multitoken.io import checkpoint

    seen: list[set[str]] = []
    real = checkpoint.write_json

    def spy(path, value):
        if Path(path).name == ckpt.LATEST_FILE:
            seen.append({p.name for p in (Path(path).parent / value["dir"]).iterdir()})
        return real(path, value)

    monkeypatch.setattr(checkpoint, "write_json", spy)
    opt = {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
           "param_groups": [{"params": ["w"], "lr": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}]}
    ckpt.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, opt, {"torch": torch.get_rng_state()}, {})
    assert seen == [{ckpt.WEIGHTS_FILE, ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE, ckpt.STATE_FILE}]


def test_tokenizer_fingerprint_sees_the_table_and_eos_not_just_the_size(tmp_path):
    from multitoken.data.tokenizer import Tokenizer

    a = Tokenizer.train_bpe(["one two three four five six " * 20, "alpha beta gamma delta " * 20], 280)
    b = Tokenizer.train_bpe(["zeta eta theta iota kappa " * 20, "lambda mu nu xi omicron " * 20], 280)
    assert a.vocab_size == b.vocab_size == 280
    assert a.fingerprint() != b.fingerprint()  # same size, other table
    a.save(tmp_path / "a")
    assert Tokenizer.load(tmp_path / "a").fingerprint() == a.fingerprint()  # saved and reloaded: the same
    vocab = a._tok.get_vocab()
    some = next(t for t, i in sorted(vocab.items(), key=lambda x: x[1]) if t != a.eos_token and i > 10)
    assert Tokenizer.load(tmp_path / "a" / "tokenizer.json", eos_token=some).fingerprint() != a.fingerprint()


def test_shard_crc_chains_over_verify_chunks(tmp_path, monkeypatch):
    """The header CRC of a shard written in pieces is zlib's CRC-32 of all its token bytes (computed
    here in one call), and a byte flipped in the first of several verify chunks is caught."""
    from multitoken.data import shards

    monkeypatch.setattr(shards, "VERIFY_CHUNK", 64)  # several chunks in a small shard
    tokens = (np.arange(1000) * 7 % 250).astype(np.uint16)
    path = tmp_path / "t.bin"
    with shards.ShardWriter(path, 256) as w:  # in pieces, as prepare writes documents
        for piece in np.array_split(tokens, 9):
            w.write(piece)
    assert shards.read_header(path).crc32 == zlib.crc32(tokens.tobytes())
    shards.read_shard(path, 256)  # intact: loads
    raw = bytearray(path.read_bytes())
    raw[shards.HEADER.size + 10] ^= 0x01  # inside chunk 0
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        shards.read_shard(path, 256)


def test_no_sync_skips_the_all_reduce_on_every_micro_batch_but_the_last():
    from multitoken.training import parallel

    class FakeDDP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.entered = 0

        @contextlib.contextmanager
        def no_sync(self):
            self.entered += 1
            yield

    model = FakeDDP()
    for j in range(4):
        with parallel.no_sync(model, j == 3):
            pass
    assert model.entered == 3  # micro-batches 0, 1, 2 skip; the last syncs

    class FakeFSDP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls: list[bool] = []

        def set_requires_gradient_sync(self, sync: bool) -> None:
            self.calls.append(sync)

    fsdp = FakeFSDP()
    for j in range(3):
        with parallel.no_sync(fsdp, j == 2):
            pass
    assert fsdp.calls == [False, False, True]


# ---- survivors of the fresh round of mutants (docs/testing.md lists the round) --------------------------


def test_top_p_keeps_the_smallest_set_that_reaches_it_exactly():
    """Four equal tokens (p = 0.25 exactly) and top_p 0.5: two tokens reach 0.5, so two stay."""
    from multitoken.decoding.sampling import Sampling, probs

    p = probs(torch.zeros(4), Sampling(1.0, 0, 0.5))
    assert sorted(p.tolist()) == [0.0, 0.0, 0.5, 0.5]
    assert sorted(probs(torch.zeros(4), Sampling(1.0, 0, 0.75)).tolist()) == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])


def test_logged_tokens_count_every_step_by_hand(data, tmp_path):
    from multitoken.training.trainer import train

    train(tiny_train_config(steps=3), data, tmp_path / "run", progress=False)
    assert [r["tokens"] for r in records(tmp_path / "run")] == [s * 4 * 32 for s in (1, 2, 3)]  # batch 4 x seq_len 32


def test_grad_clip_zero_means_no_clipping():
    from multitoken.training.trainer import optimizer_update

    for clip, want in ((0.0, -10.0), (1.0, -1.0)):
        w = torch.nn.Parameter(torch.zeros(1))
        w.grad = torch.tensor([10.0])
        norm = optimizer_update(torch.optim.SGD([w], lr=1.0), [w], 1.0, clip)
        assert float(norm) == 10.0 and w.item() == pytest.approx(want)


def test_missing_kv_heads_default_to_the_attention_heads_as_in_transformers():
    from transformers import LlamaConfig

    from multitoken.io.hf import config_from_hf

    hf = {k: v for k, v in HF.items() if k != "num_key_value_heads"}
    assert config_from_hf(dict(hf)).n_kv_heads == LlamaConfig(**hf).num_key_value_heads == 4


def test_cleanup_deletes_only_the_exact_temporary_names(tmp_path):
    from multitoken.io import outdir

    ours = tmp_path / ".config.json.k2j_h5g6.tmp"  # what mkstemp makes
    theirs = [tmp_path / n for n in (".config.json.My Backup.tmp", ".config.json.old-v2.tmp", ".config.json..tmp")]
    for p in [ours, *theirs]:
        p.write_text("x")
    assert outdir.remove_temporaries(tmp_path, ["config.json"]) == 1
    assert not ours.exists() and all(p.exists() for p in theirs)

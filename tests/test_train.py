"""Training loop: config precedence and errors, loss goes down, exact resume, SIGKILL safety,
gradient accumulation, frozen backbone and --init."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitoken.cli import build_parser, main
from multitoken.config import ModelConfig, TrainConfig
from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from multitoken.model import Transformer
from multitoken.training.trainer import resolve_config, train
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


def vocab(data: Path) -> int:
    return json.loads((data / "meta.json").read_text())["vocab_size"]


def train_records(run: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ---- configuration -----------------------------------------------------------------------------


def test_toml_unknown_key_is_one_line_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("steps = 5\nlearning_rate = 0.1\n")
    with pytest.raises(UserError) as e:
        resolve_config({}, f)
    msg = str(e.value)
    assert "\n" not in msg and "learning_rate" in msg and "batch_size" in msg  # names the bad key and lists known ones


def test_cli_overrides_toml_overrides_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 5\nlr = 0.01\nbetas = [0.8, 0.9]\nloss-weights = [1.0, 0.5, 0.25]\nheads = "medusa:2"\n')
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--config", str(f), "--lr", "0.02",
                                      "--freeze-backbone", "--batch-size", "6"])
    fields = set(TrainConfig.__dataclass_fields__)
    cfg = resolve_config({k: v for k, v in vars(args).items() if k in fields}, args.config)
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.betas) == (5, 0.02, 6, (0.8, 0.9))
    assert cfg.loss_weights == [1.0, 0.5, 0.25] and cfg.heads == "medusa:2" and cfg.freeze_backbone
    assert cfg.seq_len == TrainConfig().seq_len  # untouched fields keep the defaults


# ---- training ----------------------------------------------------------------------------------


def test_short_run_lowers_loss_and_writes_run_dir(data, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_train_config(steps=24, lr=1e-2, eval_every=12), data, run, progress=False)
    losses = [r["loss_per_depth"][0] for r in train_records(run)]
    assert len(losses) == 24
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert result["val_loss_per_depth"][0] < losses[0] and len(result["val_accuracy_per_depth"]) == 3
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vocab_size"] == vocab(data) and config["train"]["steps"] == 24
    assert config["model"]["heads"] == {"kind": "parallel", "depth": 2, "medusa_layers": 1}
    for name in ("model.safetensors", "tokenizer.json", "loss.png", "accuracy_per_depth.png", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    model, tok = ckpt.load_run(run)  # what eval/generate read
    assert model.depth == 2 and tok.vocab_size == vocab(data)
    assert len(train_records(run, "val")) == 2


def test_resume_equals_uninterrupted_bit_for_bit(data, tmp_path):
    cfg = tiny_train_config(steps=8, save_every=4, heads="sequential:1", grad_accum=2)
    train(cfg, data, tmp_path / "full", progress=False)
    train(cfg, data, tmp_path / "cut", progress=False, stop_after=4)
    assert [r["step"] for r in train_records(tmp_path / "cut")] == [1, 2, 3, 4]
    train(cfg, data, tmp_path / "cut", resume=True, progress=False)
    full, cut = train_records(tmp_path / "full"), train_records(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    assert [r["loss_per_depth"] for r in cut] == [r["loss_per_depth"] for r in full]  # exact equality, fp32 CPU
    a, b = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_stops_with_a_checkpoint_and_resume_finishes_bit_for_bit(data, tmp_path):
    """--max-minutes: each time-boxed call stops after its first step past the budget, saves, and the
    run resumed call after call ends as the uninterrupted one (a shared sequential module trains too)."""
    cfg = tiny_train_config(steps=5, save_every=100, heads="sequential:2:shared")
    train(cfg, data, tmp_path / "full", progress=False)
    steps = [train(cfg, data, tmp_path / "cut", progress=False, max_minutes=1e-9)["step"]]
    while steps[-1] < 5:
        steps.append(train(cfg, data, tmp_path / "cut", resume=True, progress=False, max_minutes=1e-9)["step"])
    assert steps == [1, 2, 3, 4, 5]
    full, cut = train_records(tmp_path / "full"), train_records(tmp_path / "cut")
    assert [r["loss_per_depth"] for r in cut] == [r["loss_per_depth"] for r in full]
    a, b = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "cut/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("mtp.layers.1.") for k in a)  # one module's weights, used at both depths


def test_grad_accumulation_matches_one_big_batch(data, tmp_path):
    """Per-depth means are weighted by valid-target counts, so 2 micro-batches of 2 == 1 batch of 4."""
    one = train(tiny_train_config(steps=3), data, tmp_path / "one", progress=False)
    two = train(tiny_train_config(steps=3, grad_accum=2), data, tmp_path / "two", progress=False)
    for r1, r2 in zip(train_records(tmp_path / "one"), train_records(tmp_path / "two")):
        assert r1["loss_per_depth"] == pytest.approx(r2["loss_per_depth"], rel=1e-5, abs=1e-6)
    assert one["val_loss_per_depth"] == pytest.approx(two["val_loss_per_depth"], rel=1e-4)


def test_freeze_backbone_from_init_keeps_backbone_bit_identical(data, tmp_path):
    train(tiny_train_config(steps=3, heads="none"), data, tmp_path / "base", progress=False)
    train(tiny_train_config(steps=3, heads="medusa:2", init=str(tmp_path / "base"), freeze_backbone=True, distill=True,
                            lr=1e-2), data, tmp_path / "heads", progress=False)
    base, heads = load_file(str(tmp_path / "base/model.safetensors")), load_file(str(tmp_path / "heads/model.safetensors"))
    assert set(base) == {k for k in heads if not k.startswith("mtp.")}
    assert all(torch.equal(base[k], heads[k]) for k in base)
    # The heads did train: Medusa residual branches start at zero.
    assert any(heads[k].abs().sum() > 0 for k in heads if k.startswith("mtp.") and "blocks" in k)
    # The main head's loss has no gradient: not computed in training steps (and the log says so), measured at evaluation.
    rec = train_records(tmp_path / "heads")[-1]
    assert rec["loss_per_depth"][0] is None and rec["main_loss"].startswith("skipped") and None not in rec["loss_per_depth"][1:]
    assert None not in train_records(tmp_path / "heads", "val")[-1]["loss_per_depth"]
    # The optimizer held the head parameters only.
    state = json.loads((tmp_path / "heads/checkpoints/step_00000003/state.json").read_text())
    assert all(n.startswith("mtp.") for g in state["optimizer_param_groups"] for n in g["params"])


# ---- one-line errors ---------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_errors_are_one_line(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--out", out, "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--quiet"]
    code, msg = run_cli(["train", "--data", str(tmp_path / "missing"), *common], capsys)
    assert code == 2 and msg.startswith("error:") and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    code, msg = run_cli(["train", "--data", str(tmp_path / "empty"), *common], capsys)
    assert code == 2 and "multitoken prepare" in msg
    code, msg = run_cli(["train", "--data", str(data), *common, "--heads", "none", "--freeze-backbone"], capsys)
    assert code == 2 and "--heads" in msg
    code, msg = run_cli(["train", "--data", str(data), *common, "--loss-kernel", "liger"], capsys)
    assert code == 2 and "--loss-kernel" in msg and "chunked" in msg  # needs CUDA (and the package): names the fix
    code, msg = run_cli(["train", "--data", str(data), *common, "--recompute", "maybe"], capsys)
    assert code == 2 and "recompute" in msg
    toml = tmp_path / "bad.toml"
    toml.write_text("stepz = 3\n")
    code, msg = run_cli(["train", "--data", str(data), *common, "--config", str(toml)], capsys)
    assert code == 2 and "stepz" in msg
    small = tmp_path / "small_vocab"  # a pretrained model whose vocabulary (100) is smaller than the data's (~300)
    ckpt.save_run(small, Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                 intermediate_size=64)))
    code, msg = run_cli(["train", "--data", str(data), *common, "--init", str(small)], capsys)
    assert code == 2 and str(vocab(data)) in msg and "100" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_refuses_to_overwrite_a_run(data, tmp_path):
    train(tiny_train_config(steps=1), data, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="--resume"):
        train(tiny_train_config(steps=2), data, tmp_path / "run", progress=False)


# ---- SIGKILL between any two writes --------------------------------------------------------------


def check_run_dir_loadable(run: Path) -> None:
    """Every file in RUN_DIR parses, and the checkpoint the pointer names is complete."""
    for path in run.rglob("*"):
        if path.is_dir() or path.name.endswith(".tmp"):  # a killed atomic_write's temporary; never read
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None
    ckpt.load_checkpoint(latest)
    ckpt.load_run(run)


# A child process that SIGKILLs itself just before its N-th os.replace, i.e. at the moment between
# one file of a save becoming visible and the next: every such moment can be hit, deterministically.
KILL_AT_REPLACE = """
import os, signal, sys
n, calls, real = int(sys.argv[1]), [], os.replace
def replace(src, dst):
    calls.append(str(dst))
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from multitoken.cli import main
code = main(sys.argv[3:])
open(sys.argv[2], "w").write("\\n".join(calls))
sys.exit(code)
"""


@pytest.mark.slow
def test_sigkill_between_any_two_checkpoint_writes_leaves_a_loadable_run(data, tmp_path, capsys):
    """SIGKILL at every moment between two renames of the second checkpoint's save (its weights,
    optimizer, RNG, state, the latest pointer and the pruning of old checkpoints): the run stays
    loadable, the pointer names a complete checkpoint, and resume finishes with no gap.

    Deterministic: a pointer moved before the files it names is caught in 100% of runs (the kill
    before state.json lands is always among the moments), where a kill after a random sleep
    caught it in about 40%."""
    argv = ["train", "--data", str(data), "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--save-every", "1",
            "--log-every", "1", "--eval-every", "0", "--device", "cpu", "--seed", "0", "--quiet", "--warmup", "2",
            "--keep-checkpoints", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def child(n: int, run: Path) -> tuple[int, list[str]]:
        log = tmp_path / f"replaces_{n}.txt"
        proc = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, str(n), str(log), *argv, "--out", str(run)],
                              env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, (log.read_text().splitlines() if log.exists() else [])

    code, calls = child(0, tmp_path / "full")  # never killed: lists the renames in order
    assert code == 0
    first2 = min(i for i, c in enumerate(calls, 1) if "step_00000002" in c)
    first3 = min(i for i, c in enumerate(calls, 1) if "step_00000003" in c)
    # The whole second save: its checkpoint files, the pointer, pruning, then the run weights and plots
    # (the run weights come last since a finished run's weights must never stand without a checkpoint).
    moments = range(first2, first3)
    assert any("step_00000002" in calls[n - 1] and calls[n - 1].endswith("state.json") for n in moments)
    for n in moments:
        run = tmp_path / f"killed_{n}"
        code, _ = child(n, run)
        assert code == -signal.SIGKILL, (n, calls[n - 1])
        check_run_dir_loadable(run)
        assert ckpt.read_json(run / "checkpoints" / "latest.json")["step"] in (1, 2)
        assert main([*argv, "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
        assert [r["step"] for r in train_records(run)] == [1, 2, 3], n  # no gap, no duplicate
        assert not list(run.rglob(".*.tmp"))
        check_run_dir_loadable(run)


@pytest.mark.parametrize("kind", ["parallel", "sequential", "medusa"])
def test_frozen_backbone_builds_no_graph(kind):
    """With the backbone frozen, autograd records only the heads: the main hidden state has no graph."""
    from conftest import tiny_model

    model = tiny_model(kind, 2)
    model.freeze_backbone()
    hiddens = model(torch.randint(0, 61, (2, 8)))
    assert hiddens[0].grad_fn is None and not hiddens[0].requires_grad
    assert all(h.requires_grad for h in hiddens[1:])


def test_param_groups_decay_matrices_but_not_the_tied_embedding_norms_or_biases():
    """AdamW groups named by hand: the token embedding (tied to the LM head; decay would shrink the rows
    of rare tokens, which few gradients restore) stays undecayed like norms and biases; every other matrix decays."""
    from conftest import tiny_model

    from multitoken.training.trainer import param_groups

    model = tiny_model("medusa", 2)
    assert model.lm_head.weight is model.embed_tokens.weight
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    name = {id(p): n for n, p in model.named_parameters()}
    want_plain = {"embed_tokens.weight", "norm.weight", *(f"layers.{i}.{k}_layernorm.weight" for i in range(3)
                                                          for k in ("input", "post_attention")),
                  *(f"mtp.heads.{h}.blocks.0.linear.bias" for h in range(2))}
    assert {name[id(p)] for p in no_decay["params"]} == want_plain
    assert {name[id(p)] for p in decay["params"]} == set(name.values()) - want_plain


def test_first_nonfinite_keeps_the_first_bad_step():
    """Gradient norms 1, inf, 2, nan, 3 at steps 1..5: the run diverged at step 2, not 4."""
    from multitoken.training.trainer import StepStats, first_nonfinite

    first = torch.tensor(-1)
    for step, gn in enumerate([1.0, float("inf"), 2.0, float("nan"), 3.0], 1):
        z = torch.zeros(3)
        first = first_nonfinite(first, StepStats(z, z, z, torch.tensor(gn)), step)
    assert int(first) == 2


def _with_masks(monkeypatch, make_mask):
    """Make TokenLoader yield (tokens, mask) pairs, as it does for data with a loss-mask shard."""
    from multitoken.data.loader import TokenLoader

    real_next, real_eval = TokenLoader.__next__, TokenLoader.eval_batches
    monkeypatch.setattr(TokenLoader, "__next__", lambda self: (lambda w: (w, make_mask(w)))(real_next(self)))
    monkeypatch.setattr(TokenLoader, "eval_batches",
                        lambda self, n=None: ((w, make_mask(w)) for w in real_eval(self, n)))


def test_training_accepts_token_mask_pairs_and_masked_targets_leave_the_loss(data, tmp_path, monkeypatch):
    """An all-true mask trains bit for bit as plain windows; masking the first half of every window
    lowers each depth's target count in training and evaluation (and the run still trains)."""
    cfg = tiny_train_config(steps=2, heads="sequential:2")
    plain = train(cfg, data, tmp_path / "plain", progress=False)
    with monkeypatch.context() as m:
        _with_masks(m, lambda w: torch.ones_like(w, dtype=torch.bool))
        ones = train(cfg, data, tmp_path / "ones", progress=False)
    assert [r["loss_per_depth"] for r in train_records(tmp_path / "ones")] == \
        [r["loss_per_depth"] for r in train_records(tmp_path / "plain")]
    assert ones["val_loss_per_depth"] == plain["val_loss_per_depth"]

    def half(w):
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[:, : w.shape[1] // 2] = False
        return mask

    with monkeypatch.context() as m:
        _with_masks(m, half)
        train(cfg, data, tmp_path / "half", progress=False)
    val_plain, val_half = train_records(tmp_path / "plain", "val")[-1], train_records(tmp_path / "half", "val")[-1]
    assert all(h < p for h, p in zip(val_half["count_per_depth"], val_plain["count_per_depth"]))


def test_recipe_options_train_from_init(data, tmp_path):
    """The head-training recipe's options together: frozen backbone from --init, distillation,
    training-time test, pass-through eh_proj, decaying depth weights, small loss chunks."""
    train(tiny_train_config(steps=2, heads="none"), data, tmp_path / "base", progress=False)
    out = train(tiny_train_config(steps=3, heads="sequential:3", init=str(tmp_path / "base"), freeze_backbone=True,
                                  distill=True, ttt=True, eh_pass_through=True, loss_weights="decay:2",
                                  loss_chunk_rows=24, lr=1e-2), data, tmp_path / "heads", progress=False)
    assert all(v is not None and v == v for v in out["train_loss_per_depth"][1:])
    saved = json.loads((tmp_path / "heads/config.json").read_text())["train"]
    assert saved["ttt"] and saved["eh_pass_through"] and saved["loss_weights"] == "decay:2.0"
    with pytest.raises(UserError, match="--ttt needs"):
        train(tiny_train_config(steps=1, heads="parallel:2", ttt=True), data, tmp_path / "bad", progress=False)

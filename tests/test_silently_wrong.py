"""Nothing silently wrong: a run's replaced tokenizer, data of another tokenizer than the --init
model's, a diverged loss, a malformed loss-weight schedule and an incomplete model config are
each one line, never a garbage result with exit status 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitoken.config import parse_schedule
from multitoken.data.prepare import prepare
from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from multitoken.training.trainer import train
from test_outdirs import TRAIN_ARGS, assert_one_line_error, run_cli
from train_helpers import make_data, one_thread, tiny_train_config, write_corpus  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """The same corpus under another BPE of the same size: same vocab_size, other ids."""
    root = tmp_path_factory.mktemp("other")
    corpus = write_corpus(root / "corpus.txt", seed=7)
    (root / "more.txt").write_text("entirely different words for another tokenizer\n" * 40)
    corpus.write_text(corpus.read_text() + (root / "more.txt").read_text())
    prepare(str(corpus), "bpe:298", root / "data", val_fraction=0.15, progress=False)  # the main data BPE reaches 298
    return root / "data"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_train_config(steps=2, save_every=2), data, out, progress=False)
    return out


# ---- tokenizers --------------------------------------------------------------------------------


def test_generate_and_eval_refuse_a_replaced_tokenizer(run, data, other_data, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.copy(other_data / "tokenizer.json", copy / "tokenizer.json")
    code, err, _ = run_cli(["generate", "--run", str(copy), "--prompt", "one two", "--max-new-tokens", "2"], capsys)
    assert_one_line_error(code, err, "tokenizer", "fingerprint")
    code, err, _ = run_cli(["eval", "--run", str(copy), "--data", str(data), "--batches", "1"], capsys)
    assert_one_line_error(code, err, "tokenizer", "fingerprint")
    # the run's own tokenizer still generates
    code, err, _ = run_cli(["generate", "--run", str(run), "--prompt", "one two", "--max-new-tokens", "2"], capsys)
    assert code == 0, err


def test_convert_and_retrofit_runs_record_their_tokenizer(run, tmp_path):
    model, tok = ckpt.load_run(run)
    ckpt.save_run(tmp_path / "saved", model, tok)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tokenizer_sha256"] == tok.fingerprint()


def test_init_and_retrofit_refuse_data_of_another_tokenizer(run, other_data, tmp_path, capsys):
    assert json.loads((other_data / "meta.json").read_text())["vocab_size"] == \
        json.loads((run / "config.json").read_text())["model"]["vocab_size"]  # sizes agree: only identity tells
    code, err, _ = run_cli(["train", "--data", str(other_data), "--out", str(tmp_path / "a"), *TRAIN_ARGS,
                            "--init", str(run)], capsys)
    assert_one_line_error(code, err, "different tokenizer", "--tokenizer")
    code, err, _ = run_cli(["retrofit", "--init", str(run), "--data", str(other_data), "--heads", "medusa:1",
                            "--out", str(tmp_path / "b"), "--quiet", "--tokens", "512", "--seq-len", "32",
                            "--batch-size", "4"], capsys)
    assert_one_line_error(code, err, "different tokenizer", "--tokenizer")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- a diverged run stops, keeping its last good checkpoint ------------------------------------


def test_a_diverged_run_stops_at_the_first_nonfinite_loss(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"not finite at step (\d+)") as e:
        train(tiny_train_config(steps=6, save_every=1, log_every=3, lr=1e9, warmup=0, grad_clip=0.0), data, out,
              progress=False)
    bad = int(e.value.args[0].split("at step ")[1].split()[0])
    assert bad >= 2
    latest = ckpt.read_json(out / "checkpoints" / "latest.json")["step"]
    assert latest < bad  # the NaN step was never saved
    for f in [out / "model.safetensors", *sorted((out / "checkpoints").glob("step_*/model.safetensors"))]:
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values()), f
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: NaN is not
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_the_cli_reports_divergence_in_one_line(data, tmp_path, capsys):
    args = [a for a in TRAIN_ARGS]
    args[args.index("--lr") + 1] = "1e9"
    code, err, out = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "r"), *args, "--grad-clip", "0"], capsys)
    assert_one_line_error(code, err, "not finite", "--lr")
    assert "NaN" not in out


# ---- loss-weight schedules ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["0.3,0.1@", "0.3,0.1@0", "0.3,0.1@5,0.05@3", "0.3,0.1@5,0.2@5", "0.3,0.1", "0.3,,0.1@4",
                                  [(5, 0.1), (0, 0.3)], [(0, 0.3), (0, 0.1)]])
def test_malformed_schedules_are_refused(spec):
    with pytest.raises(UserError, match="schedule") as e:
        parse_schedule(spec)
    if spec in ("0.3,0.1@", "0.3,0.1"):  # the message says what is missing
        assert "names no step" in str(e.value)


def test_well_formed_schedules_parse_as_written():
    assert parse_schedule("0.3") == [(0, 0.3)]
    assert parse_schedule("0.3,0.1@5,0.05@30") == [(0, 0.3), (5, 0.1), (30, 0.05)]
    assert parse_schedule([(0, 0.3), (5, 0.1)]) == [(0, 0.3), (5, 0.1)]


def test_cli_refuses_an_empty_schedule_step(data, tmp_path, capsys):
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN_ARGS,
                            "--loss-weights", "lambda", "--mtp-lambda", "0.3,0.1@"], capsys)
    assert_one_line_error(code, err, "0.1@")


# ---- a run's model config is complete ----------------------------------------------------------


@pytest.mark.parametrize("key", ["eos_id", "rope_theta", "norm_eps", "max_seq_len", "tie_embeddings", "n_heads"])
def test_a_model_config_missing_a_key_is_one_line(key, run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    config = json.loads((copy / "config.json").read_text())
    del config["model"][key]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=key):
        ckpt.load_run(copy)
    code, err, _ = run_cli(["generate", "--run", str(copy), "--prompt", "one", "--max-new-tokens", "1"], capsys)
    assert_one_line_error(code, err, key, "config.json")


def test_a_checkpoint_config_missing_a_key_is_refused(run, data, tmp_path, capsys):
    """The copy of the model config in state.json is checked too (on --resume)."""
    copy = shutil.copytree(run, tmp_path / "run")
    state_path = copy / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["model"]["eos_id"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(UserError, match="eos_id"):
        train(tiny_train_config(steps=4, save_every=2), data, copy, resume=True, progress=False)

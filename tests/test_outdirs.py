"""--out folders and damaged files: a folder holding a user's files is refused (and left byte for
byte as it was), cleanup touches only our own temporaries, a damaged model.safetensors is a
one-line error naming it, --resume falls back past a damaged checkpoint to the previous one, and
options that would reshape a resumed run's model are refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitoken.cli import main
from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from multitoken.training.trainer import train
from train_helpers import make_data, one_thread, tiny_train_config, write_corpus  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6  # the runs below: 6 steps, a checkpoint every 2, cut after 4
TRAIN_ARGS = ["--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--lr", "0.003",
              "--min-lr", "0.0003", "--eval-every", "0", "--eval-batches", "2", "--save-every", "2", "--log-every", "1",
              "--seed", "0", "--device", "cpu", "--dtype", "fp32", "--heads", "parallel:2", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """'full': 6 uninterrupted steps (the reference); 'cut': the same run stopped after step 4
    (checkpoints step 2 and step 4), to be copied and resumed."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_train_config(steps=STEPS, save_every=2)
    train(cfg, data, root / "full", progress=False)
    train(cfg, data, root / "cut", progress=False, stop_after=4)
    return {"full": root / "full", "cut": root / "cut"}


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones included): path -> sha256 of its bytes ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def user_folder(root: Path) -> Path:
    """A folder of a user's own files, with the names we write and the temporaries we delete among them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("my notes\n")
    # A config.json with "model" and "train" sections, as other tools write: not a run of ours.
    (root / "config.json").write_text(json.dumps({"model": {"name": "my-bert", "dim": 8}, "train": {"lr": 1}}))
    (root / "metrics.jsonl").write_text("# my header, not JSON\n{\"step\": 1}\n")
    (root / "tokenizer.json").write_text("{}")
    (root / "meta.json").write_text('{"format": 1}')
    (root / "train.bin").write_bytes(b"\x00" * 16)
    (root / ".config.json.abcd1234.tmp").write_text("a file of mine whose name looks like our temporary")
    deep = root / "project" / "sub"
    deep.mkdir(parents=True)
    (deep / ".x.tmp").write_text("an editor's swap file")
    (deep / "model.safetensors").write_bytes(b"not ours")
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of `multitoken ARGV`."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def assert_one_line_error(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


# ---- folders we did not write are refused and left as they were -------------------------------


def test_train_refuses_a_folder_of_user_files(data, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = tree(folder)
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(folder), *TRAIN_ARGS], capsys)
    assert_one_line_error(code, err, str(folder), "new or empty folder")
    assert tree(folder) == before
    # --resume does not make it ours either
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(folder), *TRAIN_ARGS, "--resume"], capsys)
    assert_one_line_error(code, err, str(folder))
    assert tree(folder) == before


def test_prepare_refuses_a_folder_of_user_files(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=20)
    folder = user_folder(tmp_path / "mine")
    before = tree(folder)
    for extra in ([], ["--force"]):
        code, err, _ = run_cli(["prepare", "--corpus", str(corpus), "--tokenizer", "bytes", "--out", str(folder),
                                "--quiet", *extra], capsys)
        assert_one_line_error(code, err, str(folder), "new or empty folder")
        assert tree(folder) == before


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_out_dot_is_refused(command, data, tmp_path, capsys, monkeypatch):
    """--out . in a working folder of the user's (the old sweep would have reached all of it)."""
    home = user_folder(tmp_path / "home")
    before = tree(home)
    monkeypatch.chdir(home)
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=20)
    argv = (["train", "--data", str(data), "--out", ".", *TRAIN_ARGS] if command == "train" else
            ["prepare", "--corpus", str(corpus), "--tokenizer", "bytes", "--out", ".", "--quiet"])
    code, err, _ = run_cli(argv, capsys)
    assert_one_line_error(code, err, "--out .")
    assert tree(home) == before


def test_a_data_dir_is_not_a_run(data, tmp_path, capsys):
    """Each command's folder is its own: train refuses to write into a DATA_DIR of ours."""
    copy = shutil.copytree(data, tmp_path / "data")
    before = tree(copy)
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(copy), *TRAIN_ARGS], capsys)
    assert_one_line_error(code, err, "DATA_DIR")
    assert tree(copy) == before


def test_own_run_resumes_and_only_our_temporaries_go(data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    # What a killed writer of ours leaves (exact atomic_write names) ...
    ours = [run / ".config.json.k2j4h5g6.tmp", run / "checkpoints" / ".latest.json.a1b2c3d4.tmp",
            run / "checkpoints" / "step_00000004" / ".optimizer.safetensors.zz9y8x7w.tmp"]
    for p in ours:
        p.write_text("half")
    # ... and what a user keeps in their run folder: never touched.
    (run / "notes").mkdir()
    (run / "notes" / ".draft.tmp").write_text("mine")
    (run / "notes" / ".config.json.k2j4h5g6.tmp").write_text("mine too, in a folder we did not make")
    (run / ".mine.tmp").write_text("mine")
    (run / "checkpoints" / "README").write_text("mine")
    kept = {p: p.read_bytes() for p in [run / "notes" / ".draft.tmp", run / "notes" / ".config.json.k2j4h5g6.tmp",
                                        run / ".mine.tmp", run / "checkpoints" / "README"]}
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert code == 0, err
    assert not [p for p in ours if p.exists()]
    assert {p: p.read_bytes() for p in kept} == kept
    assert ckpt.read_json(run / "checkpoints" / "latest.json")["step"] == STEPS


def test_pruning_leaves_a_checkpoint_folder_holding_user_files(data, runs, tmp_path):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    (run / "checkpoints" / "step_00000002" / "my-analysis.txt").write_text("mine")
    train(tiny_train_config(steps=STEPS, save_every=2), data, run, resume=True, progress=False)
    # keep_checkpoints=2 prunes step 2 once step 6 is written; the user's file keeps it (all of it) alive
    assert (run / "checkpoints" / "step_00000002" / "my-analysis.txt").read_text() == "mine"
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004", "step_00000006"]


# ---- a damaged model.safetensors is one line naming it -----------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts after its 8-byte length
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": truncate, "header": corrupt_header}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_weights_are_one_line_errors(damage, data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["full"], tmp_path / "run")
    weights = run / "model.safetensors"
    DAMAGES[damage](weights)
    with pytest.raises(UserError, match="model.safetensors is damaged") as e:
        ckpt.load_run(run)
    assert "\n" not in str(e.value) and str(weights) in str(e.value)
    code, err, _ = run_cli(["generate", "--run", str(run), "--prompt", "one two", "--max-new-tokens", "4",
                            "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(weights), "damaged")
    code, err, _ = run_cli(["eval", "--run", str(run), "--data", str(data), "--batches", "1", "--batch-size", "2",
                            "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(weights), "damaged")


# ---- --resume falls back past a damaged latest checkpoint -------------------------------------


def garble_json(path: Path) -> None:
    path.write_text(path.read_text()[:-7])


def assert_finished_like_the_uninterrupted_run(run: Path, full: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))  # no gap, no duplicate
    pick = [(r["step"], r["loss_per_depth"], r["lr"]) for r in records if r["split"] == "train"]
    assert pick == [(r["step"], r["loss_per_depth"], r["lr"]) for r in reference if r["split"] == "train"]
    a, b = load_file(str(run / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact: fp32 on CPU
    assert json.loads((run / "config.json").read_text())["model"] == json.loads((full / "config.json").read_text())["model"]


@pytest.mark.parametrize("damage", ["model-truncated", "optimizer-header", "state-garbled", "rng-missing"])
def test_resume_falls_back_to_the_previous_checkpoint(damage, data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    latest = run / "checkpoints" / "step_00000004"
    if damage == "model-truncated":
        truncate(latest / "model.safetensors")
    elif damage == "optimizer-header":
        corrupt_header(latest / "optimizer.safetensors")
    elif damage == "state-garbled":
        garble_json(latest / "state.json")
    else:
        (latest / "rng.safetensors").unlink()
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert code == 0, err
    said = [line for line in err if "step_00000002" in line]
    assert len(said) == 1 and "damaged" in said[0] and "step 2" in said[0], err
    assert_finished_like_the_uninterrupted_run(run, runs["full"])


def test_resume_with_a_damaged_config_json_uses_the_checkpoint_copy(data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    garble_json(run / "config.json")
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert code == 0, err
    assert len([line for line in err if "config.json" in line]) == 1, err
    assert_finished_like_the_uninterrupted_run(run, runs["full"])


def test_resume_with_no_intact_checkpoint_is_one_line(data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    for step in ("step_00000002", "step_00000004"):
        truncate(run / "checkpoints" / step / "model.safetensors")
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert_one_line_error(code, err, "no checkpoint", "model.safetensors")


# ---- options on resume -------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, run_value", [("--heads", "medusa:2", "parallel:2"), ("--preset", "small", "tiny"),
                                                      ("--max-seq-len", "64", "0")])
def test_resume_refuses_a_model_shaping_option(option, value, run_value, data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    before = tree(run)
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, option, value, "--resume"], capsys)
    assert_one_line_error(code, err, f"{option} {value}", run_value)
    assert tree(run) == before


def test_resume_names_ignored_options_in_one_line(data, runs, tmp_path, capsys):
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--lr", "0.5", "--seed", "7",
                            "--resume"], capsys)
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("ignored on resume") and "--lr 0.5" in err[0] and "--seed 7" in err[0], err
    assert "--steps" not in err[0]  # applies on resume (and equals the run's here)
    config = json.loads((run / "config.json").read_text())
    assert (config["train"]["lr"], config["train"]["seed"]) == (0.003, 0)  # what was trained, recorded
    assert_finished_like_the_uninterrupted_run(run, runs["full"])


def test_resume_applies_steps(data, runs, tmp_path, capsys):
    """--steps legitimately applies on resume: it extends the run (and is recorded)."""
    run = shutil.copytree(runs["full"], tmp_path / "run")
    argv = ["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"]
    argv[argv.index("--steps") + 1] = "8"
    code, err, _ = run_cli(argv, capsys)
    assert code == 0 and not err, err
    assert ckpt.read_json(run / "checkpoints" / "latest.json")["step"] == 8
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 8


@pytest.mark.parametrize("command", ["export", "convert", "retrofit"])
def test_other_writers_refuse_a_folder_of_user_files(command, data, runs, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = tree(folder)
    if command == "convert":  # an export of our run is a Hugging Face folder convert reads
        assert main(["export", "--run", str(runs["full"]), "--out", str(tmp_path / "hf")]) == 0
        capsys.readouterr()
    argv = {"export": ["export", "--run", str(runs["full"]), "--out", str(folder)],
            "convert": ["convert", "--hf", str(tmp_path / "hf"), "--out", str(folder)],
            "retrofit": ["retrofit", "--init", str(runs["full"]), "--data", str(data), "--heads", "medusa:1",
                         "--out", str(folder), "--quiet"]}[command]
    code, err, _ = run_cli(argv, capsys)
    assert_one_line_error(code, err, str(folder), "new or empty folder")
    assert tree(folder) == before


def test_a_run_made_before_the_marker_is_still_ours(data, runs, tmp_path, capsys):
    """Runs written before the ownership marker existed are recognised by their config.json."""
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    (run / ".multitoken.json").unlink()
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((run / ".multitoken.json").read_text())["multitoken"] == "train"
    assert_finished_like_the_uninterrupted_run(run, runs["full"])


def test_resume_refuses_data_with_another_tokenizer(runs, tmp_path, capsys):
    """Same corpus, a byte tokenizer (257 ids, fewer than the run's 300): resuming would have
    trained on other ids and replaced the run's tokenizer.json."""
    from multitoken.data.prepare import prepare

    other = tmp_path / "bytes"
    prepare(str(write_corpus(tmp_path / "corpus.txt")), "bytes", other, val_fraction=0.15, progress=False)
    run = shutil.copytree(runs["cut"], tmp_path / "run")
    before = tree(run)
    code, err, _ = run_cli(["train", "--data", str(other), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert_one_line_error(code, err, "different tokenizer")
    assert tree(run) == before

"""Nothing of a user's is lost: a finished run whose checkpoints/ went is not overwritten, an --out
inside a folder of ours is refused, bench results never land on a user's files, a second process
on one --out is refused while the first holds its lock, safetensors' own temporaries never keep a
checkpoint alive, and our files get the mode open() would give them (not mkstemp's 0600)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from multitoken.io import outdir
from multitoken.training.trainer import train
from test_outdirs import TRAIN_ARGS, assert_one_line_error, run_cli, tree, user_folder
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint every 2 steps (steps 2 and 4 kept)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_train_config(steps=4, save_every=2), data, run, progress=False)
    return run


def test_a_finished_run_without_checkpoints_is_not_overwritten(data, finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = tree(run)
    for extra in ([], ["--resume"]):
        code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, *extra], capsys)
        assert_one_line_error(code, err, str(run), "--init")
        assert tree(run) == before


def test_an_out_inside_a_run_is_refused(data, finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    before = tree(run)
    for inside in (run / "checkpoints" / "step_00000006", run / "sub"):
        code, err, _ = run_cli(["train", "--data", str(data), "--out", str(inside), *TRAIN_ARGS], capsys)
        assert_one_line_error(code, err, "inside", str(run))
        assert tree(run) == before
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n\nmore text\n")
    code, err, _ = run_cli(["prepare", "--corpus", str(corpus), "--tokenizer", "bytes", "--out", str(data / "again"),
                            "--quiet"], capsys)
    assert_one_line_error(code, err, "inside", "DATA_DIR")


def test_save_checkpoint_refuses_a_step_folder_holding_other_files(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step_00000006"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # another run's file
    with pytest.raises(UserError, match="config.json"):
        ckpt.save_checkpoint(tmp_path / "run", 6, {"w": torch.zeros(2)}, None, {"r": torch.zeros(1)}, {})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


@pytest.mark.parametrize("which", ["decode", "train"])
def test_bench_refuses_user_files_and_runs(which, finished, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    (folder / f"{which}.json").write_text("my results\n")
    for target in (folder, finished):
        before = tree(target)
        extra = ["--preset", "tiny"] if which == "decode" else []
        code, err, _ = run_cli(["bench", which, *extra, "--out", str(target)], capsys)
        assert_one_line_error(code, err, str(target))
        assert tree(target) == before


def test_a_bench_folder_of_before_the_marker_is_ours(tmp_path):
    folder = tmp_path / "bench-decode"
    folder.mkdir()
    (folder / "decode.json").write_text('{"command": "multitoken bench decode --new-tokens 8"}')
    (folder / "decode.png").write_bytes(b"png")
    assert outdir.owner(folder) == "bench"
    (folder / "decode.json").write_text('{"command": "my own tool"}')
    assert outdir.owner(folder) is None


def test_a_second_process_on_one_out_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys, time
        from multitoken.io import outdir
        with outdir.locked({str(out)!r}, "train"):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        code, err, _ = run_cli(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS], capsys)
        assert_one_line_error(code, err, str(out), "in use", f"pid {p.pid}")
        assert sorted(q.name for q in out.iterdir()) == [outdir.LOCK_FILE]  # nothing of the second run
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert not out.exists()  # the holder made the folder and wrote nothing: it went with the lock
    # the lock is released: the same command now runs
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS[:-1], "--steps", "2"], capsys)
    assert code == 0, err
    assert not (out / outdir.LOCK_FILE).exists()


def test_a_failed_command_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new"
    code, err, _ = run_cli(["prepare", "--corpus", str(tmp_path / "missing.txt"), "--tokenizer", "bytes", "--out",
                            str(out), "--quiet"], capsys)
    assert code == 2 and not out.exists(), err


def test_safetensors_temporaries_do_not_keep_a_checkpoint(data, finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    orphans = [run / "checkpoints" / "step_00000002" / ".tmpAb3dE9", run / ".tmpQ1w2E3"]
    for p in orphans:
        p.write_bytes(b"half a tensor file")
    mine = run / "checkpoints" / "step_00000004" / ".tmp-my-notes"  # not safetensors' pattern: a user's
    mine.write_text("mine")
    train(tiny_train_config(steps=8, save_every=2), data, run, resume=True, progress=False)
    assert not any(p.exists() for p in orphans)
    # keep 2: step 2 went although it held an orphan; step 4 holds a user's file and stays
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_00000004", "step_00000006", "step_00000008"]
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_open_would_give(umask, data, tmp_path):
    old = os.umask(umask)
    try:
        outdir.write_json(tmp_path / "a.json", {"x": 1})
        ckpt.save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("a.json", "t.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_run_files_get_the_umask_mode(data, tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(tiny_train_config(steps=2, save_every=2), data, run, progress=False)
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()] + [p for p in data.iterdir() if p.is_file()]
    assert files and {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files
                      if stat.S_IMODE(p.stat().st_mode) != 0o644} == {}

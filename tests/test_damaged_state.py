"""Hand-edited or damaged meta.json and checkpoint files are not trusted: every field is checked.
A bad meta.json is one line naming it; a bad checkpoint (state.json values, optimizer or rng
tensors) makes --resume fall back to the previous checkpoint, as a truncated file does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitoken.io import checkpoint as ckpt
from multitoken.training.trainer import train
from test_outdirs import TRAIN_ARGS, assert_one_line_error, run_cli
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cut(data, tmp_path_factory) -> Path:
    """A run stopped after step 4 of 6: checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("runs") / "cut"
    train(tiny_train_config(steps=6, save_every=2), data, run, progress=False, stop_after=4)
    return run


# ---- meta.json ---------------------------------------------------------------------------------


def _set(meta: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        meta = meta[p]
    if value is DELETE:
        del meta[last]
    else:
        meta[last] = value


DELETE = object()
META_DAMAGE = [("splits.train.file", "val.bin"), ("splits.train.file", "../elsewhere/train.bin"),
               ("splits.train.file", "/etc/passwd"), ("splits.train.tokens", 5), ("splits.train.tokens", "lots"),
               ("splits.val.tokens", True), ("splits.val", DELETE), ("splits", []), ("splits.train.docs", -1),
               ("vocab_size", "300"), ("eos_id", 10**6)]


@pytest.mark.parametrize("path,value", META_DAMAGE, ids=[f"{p}={v if v is not DELETE else 'deleted'}" for p, v in META_DAMAGE])
def test_a_hand_edited_meta_json_is_one_line(path, value, data, tmp_path, capsys):
    copy = shutil.copytree(data, tmp_path / "data")
    meta = json.loads((copy / "meta.json").read_text())
    _set(meta, path, value)
    (copy / "meta.json").write_text(json.dumps(meta))
    code, err, _ = run_cli(["train", "--data", str(copy), "--out", str(tmp_path / "run"), *TRAIN_ARGS], capsys)
    assert_one_line_error(code, err, "meta.json")


# ---- state.json, optimizer and rng files ------------------------------------------------------


def _state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def _edit_state(edit):
    def damage(folder: Path) -> None:
        state = _state(folder)
        edit(state)
        (folder / "state.json").write_text(json.dumps(state))
    return damage


def _edit_tensors(name: str, edit):
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / name))
        edit(tensors)
        save_file(tensors, str(folder / name))
    return damage


def _first_moment(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("/exp_avg"))


STATE_DAMAGE = {
    "step -3": _edit_state(lambda s: s.update(step=-3)),
    "step huge": _edit_state(lambda s: s.update(step=10**30)),
    "step of another folder": _edit_state(lambda s: s.update(step=2)),
    "has_optimizer false": _edit_state(lambda s: s.update(has_optimizer=False)),
    "has_optimizer 'yes'": _edit_state(lambda s: s.update(has_optimizer="yes")),
    "loader pos 10**30": _edit_state(lambda s: s["loader"].update(pos=10**30)),
    "loader pos -1": _edit_state(lambda s: s["loader"].update(pos=-1)),
    "loader epoch 1.5": _edit_state(lambda s: s["loader"].update(epoch=1.5)),
    "loader key missing": _edit_state(lambda s: s["loader"].pop("epoch")),
    "loader missing": _edit_state(lambda s: s.pop("loader")),
    "betas of one": _edit_state(lambda s: s["optimizer_param_groups"][0].update(betas=[0.9])),
    "betas of 2.0": _edit_state(lambda s: s["optimizer_param_groups"][0].update(betas=[0.9, 2.0])),
    "lr a string": _edit_state(lambda s: s["optimizer_param_groups"][0].update(lr="fast")),
    "param group removed": _edit_state(lambda s: s["optimizer_param_groups"].pop()),
    "param group resized": _edit_state(lambda s: s["optimizer_param_groups"][0]["params"].pop()),
    "param groups gone": _edit_state(lambda s: s.update(optimizer_param_groups=[])),
    "world_size 0": _edit_state(lambda s: s.update(world_size=0)),
    "optimizer key renamed": _edit_tensors("optimizer.safetensors",
                                           lambda t: t.update({"state/nonexistent/exp_avg": t.pop(_first_moment(t))})),
    "optimizer key missing": _edit_tensors("optimizer.safetensors", lambda t: t.pop(_first_moment(t))),
    "optimizer misshapen": _edit_tensors("optimizer.safetensors",
                                         lambda t: t.update({_first_moment(t): torch.zeros(3)})),
    "optimizer step misshapen": _edit_tensors("optimizer.safetensors", lambda t: t.update(
        {next(k for k in sorted(t) if k.endswith("/step")): torch.zeros(2)})),
    "rng renamed": _edit_tensors("rng.safetensors", lambda t: t.update(other=t.pop("torch"))),
    "rng misshapen": _edit_tensors("rng.safetensors", lambda t: t.update(torch=torch.zeros(2, 2))),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_bad_checkpoint_falls_back_to_the_previous_one(damage, cut, tmp_path):
    run = shutil.copytree(cut, tmp_path / "run")
    STATE_DAMAGE[damage](run / "checkpoints" / "step_00000004")
    warnings: list[str] = []
    loaded = ckpt.load_latest_checkpoint(run, warnings.append)
    assert loaded["folder"].name == "step_00000002" and loaded["step"] == 2
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "step_00000002" in warnings[0]


def test_a_loader_position_far_past_the_shard_resumes_from_the_previous_checkpoint(data, cut, tmp_path, capsys):
    """The hang of old (--resume spun forever on pos 10**30): now a fallback, and the run finishes."""
    run = shutil.copytree(cut, tmp_path / "run")
    STATE_DAMAGE["loader pos 10**30"](run / "checkpoints" / "step_00000004")
    code, err, _ = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "--resume"], capsys)
    assert code == 0, err
    assert any("resuming from step_00000002" in line for line in err)
    assert ckpt.read_json(run / "checkpoints" / "latest.json")["step"] == 6


def test_the_loader_itself_refuses_a_position_past_its_epoch(data):
    from multitoken.data.loader import TokenLoader
    from multitoken.errors import UserError

    loader = TokenLoader(data, "train", batch_size=2, seq_len=16, seed=0)
    state = loader.state_dict()
    with pytest.raises(UserError, match="past"):
        loader.load_state_dict({**state, "pos": state["n_tokens"]})

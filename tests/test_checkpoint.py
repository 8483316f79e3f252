"""Training checkpoints: optimizer state round trip through safetensors + JSON, the latest pointer,
pruning, and cleanup of what a killed writer leaves behind."""

from __future__ import annotations

import json

import torch

from multitoken.io import checkpoint as ckpt
from multitoken.model import Transformer
from multitoken.training.trainer import gather_optimizer, load_optimizer, param_groups


def trained_optimizer(model: Transformer) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        idx = torch.randint(0, model.config.vocab_size, (2, 8))
        sum(h.square().mean() for h in model(idx)).backward()
        opt.step()
        opt.zero_grad()
    return opt


def parallel_info():
    """A world of one."""
    from multitoken.training.parallel import DistInfo

    return DistInfo()


LOADER = {"epoch": 0, "pos": 3, "seed": 0, "seq_len": 8, "global_batch_size": 2, "n_tokens": 100}


def test_optimizer_state_round_trip_is_exact(tmp_path):
    from conftest import tiny_model

    model = tiny_model("medusa", 2)
    opt = trained_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    saved = gather_optimizer(model, opt, names, parallel_info(), fsdp=False)
    folder = ckpt.save_checkpoint(tmp_path, 2, ckpt.model_state(model), saved, {"torch": torch.get_rng_state()},
                                  {"loader": LOADER})
    loaded = ckpt.load_checkpoint(folder)
    assert loaded["step"] == 2 and loaded["state"]["loader"] == LOADER
    fresh = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    load_optimizer(model, fresh, loaded["optimizer"], names, fsdp=False)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    # Only safetensors and JSON: nothing in a checkpoint is a pickle.
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                         "state.json"]


def test_latest_pointer_and_pruning(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, ckpt.model_state(model), None, {"torch": torch.get_rng_state()}, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["optimizer"] is None


def test_stale_temporaries_are_removed_and_never_read(tmp_path):
    from conftest import tiny_model

    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, ckpt.model_state(model), None, {"torch": torch.get_rng_state()}, {})
    # What a SIGKILL inside atomic_write or during pruning leaves:
    (tmp_path / "checkpoints" / ".latest.json.abc.tmp").write_text('{"step": 9, "dir": "step_00000009"}')
    trash = tmp_path / "checkpoints" / ".deleting-step_00000000"
    trash.mkdir()
    (trash / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    assert ckpt.remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_00000001"]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 1

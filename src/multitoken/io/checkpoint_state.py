"""What a training checkpoint must hold before a resume trusts it.

`load_checkpoint` (checkpoint.py) calls `check_checkpoint` on everything it read from a
``checkpoints/step_NNNNNNNN`` folder. A hand-edited or damaged ``state.json`` (a step of -3, a
loader position of 10**30, betas of the wrong length, a param group gone) or optimizer/rng
tensors that do not fit the weights raise `UserError`, so `load_latest_checkpoint` falls back
to the previous checkpoint as it does for a truncated file, instead of training from a wrong
state, crashing later inside torch, or hanging in the data loader.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from multitoken.errors import UserError

LOADER_KEYS = ("epoch", "pos", "seed", "seq_len", "global_batch_size", "n_tokens")
ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check_checkpoint(folder_step: int, state: Any, weights: dict[str, torch.Tensor],
                     optimizer: dict[str, Any] | None, rng: dict[str, torch.Tensor], has_optimizer_file: bool) -> None:
    """Raise `UserError` (the reason, one line) unless a checkpoint's parts agree and are in range.

    Args:
        folder_step: the step its folder name says (``step_00000006`` -> 6).
        state: the parsed state.json.
        weights: the model tensors.
        optimizer: the name-keyed optimizer state (`optimizer_from_flat`), or None.
        rng: the RNG state tensors.
        has_optimizer_file: whether optimizer.safetensors is there.
    """
    if not isinstance(state, dict):
        raise UserError(f"state.json holds {type(state).__name__}, not an object")
    step = state.get("step")
    if not _count(step) or step != folder_step:
        raise UserError(f"state.json's step {step!r} is not its folder's ({folder_step})")
    if not isinstance(state.get("has_optimizer"), bool) or state["has_optimizer"] != has_optimizer_file:
        raise UserError(f"state.json's has_optimizer {state.get('has_optimizer')!r} disagrees with the folder "
                        f"({'an' if has_optimizer_file else 'no'} optimizer file)")
    world = state.get("world_size", 1)
    if not _count(world) or world < 1:
        raise UserError(f"state.json's world_size {world!r} is not a positive count")
    if "loader" in state or "config" in state:  # a training run's checkpoint (it records both)
        check_loader_state(state.get("loader"))
    if optimizer is not None:
        check_optimizer(optimizer, weights)
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8 or rng["torch"].dim() != 1:
        raise UserError(f"rng.safetensors lacks the torch generator state (holds {sorted(rng)[:3]})")


def check_loader_state(loader: Any) -> None:
    """The data loader's saved position: every key, whole numbers, a position inside the shard."""
    if not isinstance(loader, dict) or not all(_count(loader.get(k)) for k in LOADER_KEYS):
        raise UserError(f"state.json's loader state {str(loader)[:80]!r} lacks whole-number {', '.join(LOADER_KEYS)}")
    if loader["pos"] > loader["n_tokens"] or loader["seq_len"] < 1 or loader["global_batch_size"] < 1:
        raise UserError(f"state.json's loader position {loader['pos']} is past its shard of {loader['n_tokens']} tokens")


def check_optimizer(optimizer: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """AdamW's state: param groups with their hyper-parameters, per-parameter moments shaped like
    the weights they belong to (a weight stored under another name, such as the tied LM head, is
    not shape-checked)."""
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise UserError("state.json's optimizer_param_groups is empty or not a list")
    names: list[str] = []
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or \
                not all(isinstance(n, str) for n in g["params"]):
            raise UserError(f"state.json's optimizer param group {str(g)[:60]!r} lacks its list of parameter names")
        betas = g.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and b < 1 for b in betas)):
            raise UserError(f"state.json's optimizer betas {betas!r} are not two numbers in [0, 1)")
        for key in ("lr", "eps", "weight_decay"):
            if not _number(g.get(key)):
                raise UserError(f"state.json's optimizer {key} {g.get(key)!r} is not a finite number >= 0")
        names += g["params"]
    if len(set(names)) != len(names):
        raise UserError("state.json's optimizer param groups name a parameter twice")
    for name, entry in optimizer["state"].items():
        if name not in names:
            raise UserError(f"optimizer.safetensors holds state for {name}, which no param group names")
        missing = [k for k in ADAM_STATE_KEYS if k not in entry]
        if missing:
            raise UserError(f"optimizer.safetensors lacks {', '.join(missing)} for {name}")
        if entry["step"].dim() != 0:
            raise UserError(f"optimizer.safetensors: the step of {name} is not a number")
        shape = weights[name].shape if name in weights else entry["exp_avg"].shape
        for key in ("exp_avg", "exp_avg_sq"):
            if entry[key].shape != shape:
                raise UserError(f"optimizer.safetensors: {name}/{key} has shape {tuple(entry[key].shape)}, the weight "
                                f"{tuple(shape)}")

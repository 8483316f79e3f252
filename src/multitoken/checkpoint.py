"""Run directories: weights in safetensors, the resolved config in JSON, written atomically.

A RUN_DIR holds what `train`, `convert` or a retrofit produced and what `eval`, `generate` and
`export` read:

    config.json        {"model": ModelConfig as a dict, ...anything else the writer records}
    model.safetensors  the weights (tied LM head stored once, as embed_tokens.weight)
    tokenizer.json     the tokenizer (or what `Tokenizer.save` writes)

Every file is written to a temporary name in the same directory and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. Loading never
unpickles anything: weights come from safetensors and metadata from JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from multitoken.config import ModelConfig, from_dict
from multitoken.errors import UserError
from multitoken.model import Transformer

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto `path` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: is this a run directory made by `multitoken train` or `multitoken convert`?")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): restore it or re-create the run") from None


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The weights to store: contiguous CPU tensors, the tied LM head left out."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_weights(path: str | Path, model: Transformer) -> None:
    atomic_write(path, lambda tmp: save_file(model_state(model), tmp, metadata={"format": "pt"}))


def load_weights(path: str | Path, model: Transformer, strict: bool = True) -> list[str]:
    """Load safetensors weights into `model`; returns the model keys the file lacked (when not strict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the run has no weights yet (train it, or point at another run)")
    state = load_file(str(path))
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if strict and (missing or result.unexpected_keys):
        raise UserError(f"{path} does not match the run's config: missing {missing[:5]}, unexpected "
                        f"{result.unexpected_keys[:5]}; was config.json edited?")
    return missing


def save_run(run_dir: str | Path, model: Transformer, tokenizer=None, extra: dict[str, Any] | None = None) -> None:
    """Write config.json (the model config plus `extra`), the weights and the tokenizer."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(run_dir)
    save_weights(run_dir / WEIGHTS_FILE, model)
    write_json(run_dir / CONFIG_FILE, {"model": model.config.to_dict(), **(extra or {})})


def load_config(run_dir: str | Path) -> ModelConfig:
    data = read_json(Path(run_dir) / CONFIG_FILE)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{Path(run_dir) / CONFIG_FILE} has no 'model' section: not a multitoken run directory")
    return from_dict(ModelConfig, data["model"])


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             with_tokenizer: bool = True) -> tuple[Transformer, Any]:
    """The model (eval mode) and tokenizer of a run directory.

    Returns:
        (model, tokenizer); tokenizer is None when `with_tokenizer` is False.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: train one with `multitoken train` or `multitoken convert`")
    config = load_config(run_dir)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.init_buffers()  # every weight comes from the file (strict load), only buffers need values
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(run_dir / WEIGHTS_FILE, model)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        from multitoken.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(run_dir)
    return model, tokenizer


# ---- training checkpoints ---------------------------------------------------------------------
# RUN_DIR/checkpoints/step_00000100/ holds one complete training state:
#     model.safetensors      weights (as `model_state` stores them)
#     optimizer.safetensors  optimizer tensors, keyed "state/<param name>/<key>"
#     rng.safetensors        RNG states
#     state.json             step, data-loader state, optimizer param groups, anything else
# RUN_DIR/checkpoints/latest.json names the newest complete one and is written last: a process
# killed at any moment leaves the previous pointer, which names a checkpoint whose files were
# all renamed into place before the pointer moved.

CHECKPOINTS_DIR, LATEST_FILE, STATE_FILE = "checkpoints", "latest.json", "state.json"
OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors to safetensors atomically (tensors are copied to contiguous CPU)."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the checkpoint is incomplete; delete its folder to resume from the previous one")
    return load_file(str(path))


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state keyed by parameter name into (tensors, JSON-able param groups).

    Args:
        state: ``{"state": {name: {key: tensor|number}}, "param_groups": [{..., "params": [name, ...]}]}``.
    Returns:
        (``{"state/<name>/<key>": tensor}``, param_groups); non-tensor per-parameter values become 0-d tensors.
    """
    tensors = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"state/{name}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of `optimizer_to_flat` (tuples such as betas come back as tuples)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        _, rest = flat.split("/", 1)
        name, key = rest.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: dict[str, Any] | None, rng: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write a complete training checkpoint, then move the latest pointer, then prune old ones.

    Args:
        run_dir: the RUN_DIR.
        step: optimizer steps done.
        weights: model tensors (see `model_state`).
        optimizer: optimizer state keyed by parameter name (see `optimizer_to_flat`), or None.
        rng: RNG state tensors.
        state: JSON-able training state (data-loader state, ...); "step" is added.
        keep: checkpoints to keep, newest first.
    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, weights)
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        tensors, groups = optimizer_to_flat(optimizer)
        save_tensors(folder / OPTIMIZER_FILE, tensors)
    save_tensors(folder / RNG_FILE, rng)
    write_json(folder / STATE_FILE, {**state, "step": step, "optimizer_param_groups": groups,
                                     "has_optimizer": optimizer is not None})
    write_json(root / LATEST_FILE, {"step": step, "dir": folder.name})
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old != folder:
            _remove_tree(old)
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder the latest pointer names, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not (root / LATEST_FILE).is_file():
        return None
    pointer = read_json(root / LATEST_FILE)
    folder = root / str(pointer.get("dir", ""))
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"{root / LATEST_FILE} names {folder}, which is incomplete: delete the pointer to start over")
    return folder


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Everything `save_checkpoint` wrote into `folder`; nothing is unpickled.

    Returns:
        {"step", "weights", "optimizer" (name-keyed state or None), "rng", "state"}.
    """
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    optimizer = None
    if state.get("has_optimizer"):
        optimizer = optimizer_from_flat(load_tensors(folder / OPTIMIZER_FILE), state["optimizer_param_groups"])
    return {"step": int(state["step"]), "weights": load_tensors(folder / WEIGHTS_FILE), "optimizer": optimizer,
            "rng": load_tensors(folder / RNG_FILE), "state": state}


def remove_stale_temporaries(run_dir: str | Path) -> int:
    """Delete what a killed writer left behind: ``.NAME.*.tmp`` files of `atomic_write` and
    half-deleted ``.deleting-*`` checkpoint folders. Returns how many entries went."""
    n = 0
    for tmp in Path(run_dir).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            n += 1
    for trash in Path(run_dir).glob(f"{CHECKPOINTS_DIR}/.deleting-*"):
        _remove_tree(trash, rename=False)
        n += 1
    return n


def _remove_tree(folder: Path, rename: bool = True) -> None:
    # Rename first so that a kill halfway never leaves a half-deleted folder under a checkpoint name.
    trash = folder.with_name(f".deleting-{folder.name}") if rename else folder
    if rename:
        os.replace(folder, trash)
    for p in sorted(trash.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    trash.rmdir()

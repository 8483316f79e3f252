"""Run directories: weights in safetensors, the resolved config in JSON, written atomically.

A RUN_DIR holds what `train`, `convert` or a retrofit produced and what `eval`, `generate` and
`export` read:

    config.json        {"model": ModelConfig as a dict (complete), "tokenizer_sha256" (train: under
                       "data"), ...anything else the writer records}
    model.safetensors  the weights (tied LM head stored once, as embed_tokens.weight)
    tokenizer.json     the tokenizer (or what `Tokenizer.save` writes)
    .multitoken.json   the ownership marker (see outdir.py): which command wrote the folder

Every file is written to a temporary name in the same directory and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. Loading never
unpickles anything: weights come from safetensors and metadata from JSON. A missing, truncated
or otherwise damaged file is a one-line `UserError` naming it, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from multitoken.config import _FAMILY_DEFAULTS, ModelConfig, from_dict
from multitoken.errors import UserError
from multitoken.io.checkpoint_state import check_checkpoint
from multitoken.io.outdir import SAFETENSORS_TMP, atomic_write, remove_temporaries, temporary_pattern, write_json
from multitoken.model import Transformer

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def read_safetensors(path: str | Path, fix: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a one-line `UserError` naming the file and `fix` when
    it is missing, truncated or its header is damaged."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is damaged ({reason}): {fix}") from None


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
    return model.weights_to_store({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})


def save_weights(path: str | Path, model: Transformer) -> None:
    atomic_write(path, lambda tmp: save_file(model_state(model), tmp, metadata={"format": "pt"}))


def load_weights(path: str | Path, model: Transformer, strict: bool = True) -> list[str]:
    """Load safetensors weights into `model`; returns the model keys the file lacked (when not strict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: the run has no weights yet (train it, or point at another run)")
    state = read_safetensors(path, "restore it, or re-create the run (a training run's checkpoints/step_*/"
                                   "model.safetensors holds the same weights)")
    try:
        result = model.load_state_dict(model.weights_to_store(state), strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise UserError(f"{path} does not match the run's config ({str(e).splitlines()[-1].strip()}): "
                        "was config.json edited?") from None
    missing = model.missing_weights(result.missing_keys)
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
    recorded = {"tokenizer_sha256": tokenizer.fingerprint()} if tokenizer is not None else {}
    write_json(run_dir / CONFIG_FILE, {"model": model.config.to_dict(), **recorded, **(extra or {})})


def load_config(run_dir: str | Path) -> ModelConfig:
    """The `ModelConfig` of a run directory (its config.json's complete "model" section)."""
    data = read_json(Path(run_dir) / CONFIG_FILE)
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{Path(run_dir) / CONFIG_FILE} has no 'model' section: not a multitoken run directory")
    return complete_model_config(data["model"], Path(run_dir) / CONFIG_FILE)


def complete_model_config(data: Any, where: str | Path) -> ModelConfig:
    """A `ModelConfig` from a run's record of it, which must name every field: a missing key would
    silently take a default (another eos_id, rope_theta, ...) and change every output."""
    if isinstance(data, dict):
        # every field but those of newer families, which `to_dict` leaves out at their defaults
        missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in data and f.name not in _FAMILY_DEFAULTS]
        if missing:
            raise UserError(f"{where}: the model config lacks {', '.join(missing)}: restore the file (a training run's "
                            f"checkpoints/step_*/state.json holds a copy) or re-create the run")
    return from_dict(ModelConfig, data)


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
    model = Transformer.empty(config, device)
    model.init_buffers()  # every weight comes from the file (strict load), only buffers need values
    load_weights(run_dir / WEIGHTS_FILE, model)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        from multitoken.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(run_dir)
        check_run_tokenizer(run_dir, tokenizer)
    return model, tokenizer


def check_run_tokenizer(run_dir: str | Path, tokenizer) -> None:
    """Refuse a run whose tokenizer is not the one it was made with: config.json's fingerprint
    (`Tokenizer.fingerprint`) when it records one (runs written before it was recorded are not
    checked; generate refuses an id past the model's vocabulary by itself)."""
    data = read_json(Path(run_dir) / CONFIG_FILE)
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    recorded = section.get("tokenizer_sha256") or data.get("tokenizer_sha256")
    fix = "restore the run's own tokenizer.json (the DATA_DIR it was trained on holds a copy)"
    if isinstance(recorded, str) and recorded and tokenizer.fingerprint() != recorded:
        raise UserError(f"{Path(run_dir)}: its tokenizer is not the one the run was made with (the fingerprint differs "
                        f"from config.json's {recorded[:12]}): {fix}")


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
    return read_safetensors(path, "the checkpoint is incomplete or damaged; delete its folder to resume from the previous one")


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
        state: JSON-able training state (data-loader state, the run's config, ...); "step" is added.
        keep: checkpoints to keep, newest first.
    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in folder.iterdir() if not _checkpoint_entry(p)]
    if foreign:  # someone else's files (another run's --out made here?): never mix ours in
        raise UserError(f"{folder} holds files a checkpoint does not ({', '.join(sorted(foreign)[:3])}): move them "
                        f"out of the run directory, then resume")
    save_tensors(folder / WEIGHTS_FILE, weights)
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        tensors, groups = optimizer_to_flat(optimizer)
        save_tensors(folder / OPTIMIZER_FILE, tensors)
    save_tensors(folder / RNG_FILE, rng)
    write_json(folder / STATE_FILE, {**state, "step": step, "optimizer_param_groups": groups,
                                     "has_optimizer": optimizer is not None})
    write_json(root / LATEST_FILE, {"step": step, "dir": folder.name})
    for old in checkpoint_folders(run_dir)[keep:]:
        if old != folder:
            _remove_checkpoint(old)
    return folder


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The ``checkpoints/step_NNNNNNNN`` folders of a run, newest first (only names we write)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder the latest pointer names, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not (root / LATEST_FILE).is_file():
        return None
    pointer = read_json(root / LATEST_FILE)
    folder = root / str(pointer.get("dir", "")) if isinstance(pointer, dict) else root
    if not _STEP_DIR.fullmatch(folder.name) or not (folder / STATE_FILE).is_file():
        raise UserError(f"{root / LATEST_FILE} names {folder}, which is incomplete: delete the pointer to start over")
    return folder


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Everything `save_checkpoint` wrote into `folder`; nothing is unpickled.

    Returns:
        {"step", "weights", "optimizer" (name-keyed state or None), "rng", "state"}.
    Raises:
        UserError: a file of the checkpoint is missing or damaged (one line naming it).
    """
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    weights, rng = load_tensors(folder / WEIGHTS_FILE), load_tensors(folder / RNG_FILE)
    try:
        optimizer = None
        if isinstance(state, dict) and state.get("has_optimizer") is True:
            optimizer = optimizer_from_flat(load_tensors(folder / OPTIMIZER_FILE), state["optimizer_param_groups"])
        check_checkpoint(int(folder.name.removeprefix("step_")), state, weights, optimizer, rng,
                         (folder / OPTIMIZER_FILE).is_file())
    except (KeyError, TypeError, ValueError, AttributeError, UserError) as e:
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{folder} is damaged ({reason}): delete it to resume from the previous checkpoint") from None
    return {"step": state["step"], "weights": weights, "optimizer": optimizer, "rng": rng, "state": state}


def load_latest_checkpoint(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The newest intact checkpoint of a run: the one the latest pointer names, or, when any of its
    files is damaged, the newest older one that loads (`warn` is told which, in one line).

    Returns:
        `load_checkpoint`'s dict plus "folder", or None when the run has no checkpoint yet.
    Raises:
        UserError: no checkpoint of the run loads (the message names the newest one's damage).
    """
    warn = warn or log.warning
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not (root / LATEST_FILE).is_file():
        return None
    folders = checkpoint_folders(run_dir)
    try:
        named: Path | None = latest_checkpoint(run_dir)
        folders = [named] + [f for f in folders if f.name < named.name]  # never one the pointer did not reach
    except UserError as e:
        named, first_error = None, str(e)
    else:
        first_error = ""
    for folder in folders:
        try:
            loaded = load_checkpoint(folder)
        except UserError as e:
            first_error = first_error or str(e)
            continue
        if folder != named:
            warn(f"warning: the latest checkpoint is damaged ({first_error}); resuming from {folder.name} "
                 f"(step {loaded['step']}) instead")
        return {**loaded, "folder": folder}
    raise UserError(f"no checkpoint in {root} loads ({first_error}): train a new run with another --out")


def checkpoint_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run config ({"model", "train", ...}) recorded in the newest checkpoint whose state.json
    holds one, or None: the fallback when RUN_DIR/config.json is damaged."""
    for folder in checkpoint_folders(run_dir):
        try:
            config = read_json(folder / STATE_FILE).get("config")
        except (UserError, AttributeError):
            continue
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return config
    return None


# The names save_checkpoint writes; cleanup and pruning delete these and nothing else.
_STEP_DIR = re.compile(r"step_\d{8}")
_CHECKPOINT_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
_CHECKPOINT_TMP = temporary_pattern(_CHECKPOINT_FILES)
_TRASH_PREFIX = ".deleting-"


def remove_stale_temporaries(run_dir: str | Path, run_files: tuple[str, ...] = ()) -> int:
    """Delete what a killed writer left behind, by exact name and never recursively:
    ``.NAME.XXXXXXXX.tmp`` temporaries of `atomic_write` for the files `run_files` in RUN_DIR,
    for latest.json in RUN_DIR/checkpoints and for the checkpoint files in each ``step_NNNNNNNN``
    folder, and half-deleted ``checkpoints/.deleting-step_NNNNNNNN`` folders (their checkpoint
    files only). Returns how many entries went."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    n = remove_temporaries(run_dir, (CONFIG_FILE, WEIGHTS_FILE, *run_files))
    n += remove_temporaries(root, (LATEST_FILE,))
    for folder in checkpoint_folders(run_dir):
        n += remove_temporaries(folder, _CHECKPOINT_FILES)
    if root.is_dir():
        for trash in root.iterdir():
            if trash.name.startswith(_TRASH_PREFIX) and _STEP_DIR.fullmatch(trash.name[len(_TRASH_PREFIX):]) \
                    and trash.is_dir() and _remove_checkpoint(trash, rename=False):
                n += 1
    return n


def _checkpoint_entry(p: Path) -> bool:
    """Whether `p` is a file `save_checkpoint` writes, or a temporary of one (ours or safetensors')."""
    return p.is_file() and not p.is_symlink() and (p.name in _CHECKPOINT_FILES or bool(_CHECKPOINT_TMP.fullmatch(p.name))
                                                   or bool(SAFETENSORS_TMP.fullmatch(p.name)))


def _remove_checkpoint(folder: Path, rename: bool = True) -> bool:
    """Delete a checkpoint folder that holds only what `save_checkpoint` writes (and its
    temporaries); a folder with anything else in it is left alone. Returns whether it went."""
    entries = list(folder.iterdir())
    if not all(_checkpoint_entry(p) for p in entries):
        return False
    # Rename first so that a kill halfway never leaves a half-deleted folder under a checkpoint name.
    trash = folder.with_name(f"{_TRASH_PREFIX}{folder.name}") if rename else folder
    if rename:
        os.replace(folder, trash)
    for p in entries:
        (trash / p.name).unlink()
    trash.rmdir()
    return True

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
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
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
    if "model" not in data:
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
    model.init_weights()  # buffers (RoPE tables) and any weight the file lacks
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

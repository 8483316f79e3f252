"""Models by name: a run directory, a local Hugging Face folder, or a Hub id, loaded the same way.

``--run`` and ``convert --hf`` take any of them, as transformers' ``from_pretrained`` and vLLM's
``--model`` do:

- a run directory (config.json with a ``model`` section: train, convert, retrofit) loads as it is;
- a Hugging Face folder (config.json with a ``model_type``, an export of ours included, heads and
  all) is converted in memory;
- ``owner/name`` that is no local path is looked up in huggingface_hub's cache
  (``HF_HUB_CACHE``, ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only the cache is read, and an id it
  lacks is a one-line error. Online, a missing id is downloaded once into that cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run, read_json

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
"""``owner/name`` as the Hub spells repository ids."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name: str | Path) -> Path:
    """The local folder for `name`: the path itself, or the Hub id's snapshot in huggingface_hub's cache.

    Args:
        name: a path, or an ``owner/name`` Hub id.
    Returns:
        An existing folder. Raises a one-line `UserError` for a path that does not exist and an
        id that is neither cached nor (offline) downloadable.
    """
    p = Path(name)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p} is a file: give a run directory, a Hugging Face model folder or a Hub id (owner/name)")
        return p
    text = str(name)
    if not HUB_ID.fullmatch(text) or text.startswith(("./", "../")):
        raise UserError(f"{p} does not exist: give a run directory, a Hugging Face model folder or a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise UserError(f"{text} is not a local folder, and Hub ids need huggingface_hub: pip install 'multitoken[hf]'") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # never pickled weights
    # Read now, not when huggingface_hub was imported: a caller (or a test) may set it later.
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=patterns, cache_dir=cache))
    except HFValidationError:
        raise UserError(f"{text!r} is not a valid Hub id: give owner/name or a local folder") from None
    except Exception as e:  # noqa: BLE001  the cache raises several kinds for "not there"
        if _offline():
            raise UserError(f"{text} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
                            f"(huggingface-cli download {text}) or give a local folder") from None
        cached_error = e
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:  # noqa: BLE001  network, gated repo, unknown id: one line whatever it is
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{text} is neither a local folder nor a downloadable Hub model ({first}; cache: "
                        f"{type(cached_error).__name__})") from None


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder (its config.json names a ``model_type``), not a run directory of ours."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    data = read_json(cfg)
    return isinstance(data, dict) and "model_type" in data and "model" not in data


def load_model(name: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               heads: Any = None, max_seq_len: int | None = None) -> tuple[Any, Any, Path]:
    """The model (eval mode) and tokenizer for a run directory, a Hugging Face folder or a Hub id.

    Args:
        name: see the module docstring.
        device, dtype: where and in what precision the model computes (default: as stored, fp32 for folders).
        heads: a `HeadsConfig` of fresh heads for a folder without any (a retrofit's starting point).
        max_seq_len: a shorter context for a Hugging Face folder (see `hf.limit_context`).
    Returns:
        (model, tokenizer, the resolved folder).
    """
    folder = resolve(name)
    if not is_hf_folder(folder):  # a run directory, or something load_run explains in one line
        if heads is not None:
            raise UserError(f"{folder} is a run directory: fresh heads are added by `convert --heads` or `retrofit`, "
                            "or give a heads file")
        model, tok = load_run(folder, device=device, dtype=dtype)
        return model, tok, folder
    from multitoken.io.hf import load_hf

    model, tok, _ = load_hf(folder, heads=heads, max_seq_len=max_seq_len)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tok, folder

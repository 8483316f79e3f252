"""MTP heads alone, to ship beside a pretrained model: one safetensors file of the ``mtp.*``
weights (bf16) whose metadata holds the heads spec and a fingerprint of the backbone they were
trained on, so they are only ever attached to that model.

A heads file may also hold a draft vocabulary V' (data/draft_vocab.py), in EAGLE-3's layout:
``d2t`` (|V'|,) int64 with ``target id = i + d2t[i]`` for draft index i, and ``t2d`` (V,) bool,
True for the tokens in V'. A file without them drafts over the full vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multitoken.config import HeadsConfig
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run, read_safetensors
from multitoken.io.outdir import atomic_write
from multitoken.model import Transformer
from multitoken.model.build import build_model, limit_context

log = logging.getLogger(__name__)

HEADS_FORMAT = "multitoken-heads/1"
DRAFT_VOCAB_FORMAT = "multitoken-draft-vocab/1"
DRAFT_VOCAB_KEYS = ("d2t", "t2d")


def draft_vocab_tensors(ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """EAGLE-3's ``d2t`` (offsets) and ``t2d`` (mask) for sorted draft ids (V',)."""
    ids = ids.detach().cpu().long()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {"d2t": ids - torch.arange(ids.numel()), "t2d": t2d}


def draft_ids_from(tensors: dict[str, torch.Tensor], vocab_size: int, path: Path) -> torch.Tensor | None:
    """The draft ids a heads file's ``d2t``/``t2d`` name (None when it has neither); a one-line
    error when they are damaged or made for another vocabulary."""
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if d2t is None and t2d is None:
        return None
    fix = "write it again with `multitoken draft-vocab`"
    if d2t is None or t2d is None or d2t.dim() != 1 or t2d.dtype != torch.bool or d2t.dtype != torch.int64 or not d2t.numel():
        raise UserError(f"{path}: damaged draft vocabulary (d2t/t2d): {fix}")
    ids = d2t + torch.arange(d2t.numel())
    if t2d.shape != (vocab_size,):
        raise UserError(f"{path}: its draft vocabulary is for {t2d.numel()} tokens, the model has {vocab_size}: {fix}")
    if bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size or not torch.equal(t2d.nonzero()[:, 0], ids):
        raise UserError(f"{path}: damaged draft vocabulary (d2t and t2d disagree): {fix}")
    return ids


def backbone_fingerprint(model: Transformer) -> str:
    """sha256 of the backbone's embedding and final norm in float32: names the pretrained model that
    a heads file was trained on (the fp32 weights converted from one GGUF are the same everywhere)."""
    h = hashlib.sha256()
    for t in (model.embed_tokens.weight, model.norm.weight):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_heads(model: Transformer, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the MTP heads alone (bf16 safetensors), with the heads spec, the backbone's fingerprint
    and `info` (e.g. how they were trained) in the file's metadata. Atomic."""
    if model.mtp is None:
        raise UserError("the model has no MTP heads to save")
    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.mtp.state_dict().items()}
    if model.mtp.draft_ids is not None:
        state |= draft_vocab_tensors(model.mtp.draft_ids, model.config.vocab_size)
    h = model.config.heads
    meta = {"format": HEADS_FORMAT, "heads": str(h), "medusa_layers": str(h.medusa_layers),
            "backbone_sha256": backbone_fingerprint(model), "info": json.dumps(info or {}, sort_keys=True)}
    if h.fused:  # the spec names the flag; the layers fused are stored beside it, so loading is exact
        meta["fused_layers"] = ",".join(map(str, h.fused_layers))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path


def heads_info(path: str | Path) -> dict[str, Any]:
    """The metadata of a heads file written by `save_heads` (``info`` parsed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"heads file {path} does not exist: write one with examples/smollm2_gpu.py or `save_heads`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}): restore it or write it again") from None
    if meta.get("format") != HEADS_FORMAT:
        raise UserError(f"{path} is not a multitoken heads file (format {meta.get('format')!r}): give a file written by save_heads")
    try:
        info = json.loads(meta.get("info") or "{}")
    except ValueError:
        raise UserError(f"{path}: its 'info' metadata is not JSON: write the file again with save_heads") from None
    return {**meta, "info": info}


def heads_of(meta: dict[str, Any]) -> HeadsConfig:
    """The heads a heads file's metadata names (ValueError or UserError when it is damaged)."""
    layers = meta.get("fused_layers")
    return dataclasses.replace(HeadsConfig.parse(meta.get("heads", "")), medusa_layers=int(meta.get("medusa_layers", "1")),
                               fused_layers=[int(i) for i in layers.split(",")] if layers else [])


def attach_heads(run_dir: str | Path, heads_file: str | Path, max_seq_len: int | None = None) -> tuple[Transformer, Any]:
    """The plain pretrained model of `run_dir` with the heads of `heads_file` on it, and its tokenizer.

    Refuses heads trained on another backbone (fingerprints differ) in one line.
    """
    base, tok = load_run(run_dir)
    model = attach_heads_to(base, heads_file, str(run_dir))
    return (limit_context(model, max_seq_len) if max_seq_len else model), tok


def attach_heads_to(base: Transformer, heads_file: str | Path, run_dir: str = "the model") -> Transformer:
    """`base` (a plain model, in memory) with the heads of `heads_file` on it: a new model, same checks
    as `attach_heads`."""
    meta = heads_info(heads_file)
    if base.mtp is not None:
        raise UserError(f"{run_dir} already has {base.config.heads} heads: attach heads to a plain model")
    if meta.get("backbone_sha256") != backbone_fingerprint(base):
        raise UserError(f"{heads_file} was trained on another model than {run_dir}: attach it to the model it was trained on")
    try:
        heads = heads_of(meta)
        cfg = base.config.with_heads(heads)
    except (UserError, ValueError):
        raise UserError(f"{heads_file}: damaged metadata (heads {meta.get('heads')!r}, medusa_layers "
                        f"{meta.get('medusa_layers')!r}, fused_layers {meta.get('fused_layers')!r}): "
                        "write the file again with save_heads") from None
    tensors = read_safetensors(Path(heads_file), "write it again")
    ids = draft_ids_from(tensors, cfg.vocab_size, Path(heads_file))
    tensors = {k: v for k, v in tensors.items() if k not in DRAFT_VOCAB_KEYS}
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Transformer(cfg).mtp.state_dict().items()}
    if {k: tuple(v.shape) for k, v in tensors.items()} != want:
        raise UserError(f"{heads_file}: its tensors are not those of {heads} heads on {run_dir}'s model: write the file again with save_heads")
    device = next(base.parameters()).device
    model = build_model(cfg, {**base.state_dict(), **{"mtp." + k: v for k, v in tensors.items()}}, fresh_heads=False)
    model = model.to(device)
    model.mtp.set_draft_vocab(ids)
    return model


def load_heads_into(model: Transformer, heads_file: str | Path) -> str | None:
    """Copy the heads of `heads_file` into `model`'s heads (a warm start): the file must hold the
    same heads, or heads the model's family can start from (`HeadFamily.warm_start_from`: ordinary
    sequential heads for fused ones), and have been trained on this backbone; one-line errors otherwise.

    Returns:
        None, or one line saying what was started anew (for the log).
    """
    meta = heads_info(heads_file)
    if meta.get("backbone_sha256") != backbone_fingerprint(model):
        raise UserError(f"{heads_file} was trained on another backbone than this run's --init: give heads trained on it")
    try:
        theirs = heads_of(meta)
    except (UserError, ValueError):
        raise UserError(f"{heads_file}: damaged metadata (heads {meta.get('heads')!r}): write the file again with save_heads") from None
    mismatch = UserError(f"{heads_file} holds {meta.get('heads')} heads, this run trains {model.config.heads}: "
                         "give --heads as the file's, or another heads file")
    if model.mtp is None:
        raise mismatch
    lacking, note = set(), None
    if theirs != model.config.heads:
        plan = model.mtp.warm_start_from(theirs)
        if plan is None:
            raise mismatch
        lacking, note = plan
    tensors = {k: v for k, v in read_safetensors(Path(heads_file), "write it again").items() if k not in DRAFT_VOCAB_KEYS}
    own = model.mtp.state_dict()
    if {k: tuple(v.shape) for k, v in tensors.items()} != {k: tuple(v.shape) for k, v in own.items() if k not in lacking}:
        raise UserError(f"{heads_file}: its tensors do not match {theirs} heads on this model: write it again with save_heads")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    if note:
        log.info("--init-heads %s: %s", heads_file, note)
    return note


def save_draft_vocab(path: str | Path, ids: torch.Tensor, vocab_size: int, info: dict[str, Any] | None = None) -> Path:
    """Write a draft vocabulary alone (``d2t``/``t2d``, as in a heads file, with `info` as metadata):
    for heads files that come without one (`read_draft_vocab`). Atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": DRAFT_VOCAB_FORMAT, "vocab_size": str(vocab_size), "info": json.dumps(info or {}, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(draft_vocab_tensors(ids.sort().values, vocab_size), tmp, metadata=meta))
    return path


def read_draft_vocab(path: str | Path, vocab_size: int) -> torch.Tensor:
    """The draft ids (V',) of a file of `save_draft_vocab` or a heads file that holds them; one-line
    errors when it holds none, is damaged or was made for another vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"draft vocabulary {path} does not exist: make it with `multitoken draft-vocab` or bench/smollm2_draft_vocab.py")
    ids = draft_ids_from(read_safetensors(path, "write it again"), vocab_size, path)
    if ids is None:
        raise UserError(f"{path} holds no draft vocabulary (d2t/t2d): write one with `multitoken draft-vocab`")
    return ids


def write_draft_vocab(heads_file: str | Path, ids: torch.Tensor | None, vocab_size: int, out: str | Path | None = None) -> Path:
    """Store draft vocabulary `ids` (None: remove it) in a heads file, rewriting it atomically
    (at `out` when given, else in place); the heads and their metadata are kept as they are."""
    path = Path(heads_file)
    meta = heads_info(path)
    tensors = {k: v for k, v in read_safetensors(path, "write it again").items() if k not in DRAFT_VOCAB_KEYS}
    if ids is not None:
        if int(ids.max()) >= vocab_size:
            raise UserError(f"draft vocabulary names token {int(ids.max())}, the vocabulary has {vocab_size}: use data made with the model's tokenizer")
        tensors |= draft_vocab_tensors(ids, vocab_size)
    meta["info"] = json.dumps(meta["info"], sort_keys=True)
    target = Path(out) if out is not None else path
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return target

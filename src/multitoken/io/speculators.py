"""vLLM's speculators format: MTP heads as a drafter folder (config.json with a ``speculators_config``,
the weights in model.safetensors) that the `speculators` package loads and `vllm serve` reads.

Pinned to speculators 0.9.0 (`SPECULATORS_VERSION`): the names and fields below are those of its
``MTPSpeculatorConfig`` and ``MTPDraftModel`` (speculators/models/mtp/), and
tests/test_speculators.py loads every export with that package's own classes and compares the
logits its model computes with ours.

What maps, family by family (each family says so in ``HeadFamily.speculators_layout``):

===========================  ============================================================================
ours                         speculators 0.9.0
===========================  ============================================================================
sequential, Qwen3 backbone   ``mtp`` exactly, for the first draft: one layer, ``input_proj(cat[
                             token_layernorm(emb), hidden_layernorm(h)])``, the decoder layer, then
                             ``final_layernorm``; embedding and LM head come from the verifier. Module 1
                             is exported (``sequential:1``, or a shared module of any depth). Exported
                             with one speculative token: speculators hands step k+1 the layer's output
                             after ``final_layernorm``, our modules the state before their norm, so
                             deeper drafts would differ from ours (verification keeps any draft's output
                             exact, but acceptance would not be what we measured).
sequential, other backbones  refused: speculators builds MTP layers only from Qwen3-family decoder
                             layers (qwen3, qwen3_next, qwen3_5); Llama (SmolLM2), Qwen2, Mistral and
                             Gemma-3 have none there.
parallel, medusa             refused: every speculators type (eagle3, mtp, dflash, dflash2, dspark,
                             peagle, xpress) reads the next token's embedding beside the hidden state.
sequential with ``:fused``   refused: ``mtp`` reads the verifier's last hidden state alone (no ``fc``),
                             and ``eagle3``, which fuses three verifier layers through ``fc``, runs
                             another layer than our module (next row).
any, as ``eagle3``           not exported: EAGLE-3's first layer feeds cat[embedding, hidden] (2d wide)
                             to q/k/v with the hidden state as the residual, and its input mixes three
                             verifier layers through ``fc``; our module projects 2d -> d first and runs
                             an ordinary block on that, which no choice of EAGLE-3 weights reproduces.
===========================  ============================================================================

The verifier (``speculators_config.verifier.name_or_path``) is the model vLLM loads as the target:
by default the folder a run was converted from (`multitoken convert --hf`), else `--verifier`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.errors import UserError
from multitoken.io import outdir
from multitoken.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_run, read_json
from multitoken.io.hf import ARCHITECTURES, config_to_hf, family_of
from multitoken.io.models import HUB_ID
from multitoken.io.outdir import atomic_write, write_json
from multitoken.model.heads import family

SPECULATORS_VERSION = "0.9.0"
"""The speculators release whose definitions this file follows (and the tests load with)."""
MTP_BACKBONES = ("qwen3",)
"""Our backbone families speculators 0.9.0 builds an MTP layer for (it also has qwen3_next and qwen3_5)."""
SPECULATIVE_TOKENS = 1
"""Drafts per step in the exported proposal: the steps that compute what our heads compute."""


def backbone_problem(cfg: ModelConfig) -> str | None:
    """Why speculators' MTP layer cannot be this backbone's decoder layer (one line), or None."""
    fam = family_of(cfg)
    fix = ("export the DeepSeek layout with `multitoken export` (no --format) for transformers' use_mtp, "
           "or serve the heads with `multitoken serve`")
    if fam not in MTP_BACKBONES:
        return (f"speculators {SPECULATORS_VERSION} builds MTP layers only from Qwen3-family decoder layers "
                f"(qwen3, qwen3_next, qwen3_5) and this backbone is {fam}: {fix}")
    extra = [name for name, on in (("norm_plus_one", cfg.norm_plus_one), ("scale_embeddings", cfg.scale_embeddings),
                                   ("final_logit_softcap", bool(cfg.final_logit_softcap)),
                                   ("attn_scale", bool(cfg.attn_scale) and cfg.attn_scale != cfg.head_dim ** -0.5))
             if on]
    if extra:
        return f"this backbone has {', '.join(extra)}, which a Qwen3 decoder layer lacks: {fix}"
    return None


def resolve_verifier(run_dir: Path, verifier: str | None, cfg: ModelConfig) -> tuple[str, list[str]]:
    """(name_or_path, architectures) of the verifier: `verifier`, or the folder the run was converted from."""
    if verifier is None:
        source = read_json(run_dir / CONFIG_FILE).get("source") or {}
        if source.get("format") != "hf" or not source.get("path"):
            raise UserError("give --verifier: the Hub id or folder of the backbone the heads were trained on, which vLLM "
                            "loads as the target (e.g. the folder `multitoken export --run RUN --out DIR` writes)")
        verifier = source["path"]
    folder = Path(verifier)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"--verifier {verifier} has no config.json: give a Hugging Face model folder or a Hub id owner/name")
        hf = read_json(folder / "config.json")
        hf = hf.get("text_config", hf) if isinstance(hf, dict) else {}
        if (hf.get("hidden_size"), hf.get("vocab_size")) != (cfg.dim, cfg.vocab_size):
            raise UserError(f"--verifier {verifier} has hidden size {hf.get('hidden_size')} and vocabulary "
                            f"{hf.get('vocab_size')}, the heads {cfg.dim} and {cfg.vocab_size}: give the backbone they were trained on")
        return str(folder.resolve()), list(hf.get("architectures") or [ARCHITECTURES[family_of(cfg)]])
    if not HUB_ID.fullmatch(str(verifier)):
        raise UserError(f"--verifier {verifier} is neither a folder nor a Hub id owner/name: give one of them")
    return str(verifier), [ARCHITECTURES[family_of(cfg)]]  # not looked up: nothing is downloaded here


def speculators_config(cfg: ModelConfig, spec_type: str, verifier: str, architectures: list[str],
                       dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of an ``mtp`` speculator for `cfg` (fields of speculators' ``MTPSpeculatorConfig``)."""
    layer = config_to_hf(dataclasses.replace(cfg, heads=HeadsConfig()), family_of(cfg), dtype)
    layer.pop("multitoken")
    name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["MTPDraftModel"],
        "speculators_model_type": spec_type,
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": spec_type,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": SPECULATIVE_TOKENS,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": architectures},
        },
        "transformer_layer_config": layer,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,  # speculators' models set it: embedding and LM head are the verifier's
        "torch_dtype": name,
        "dtype": name,
        "multitoken": {"heads": str(cfg.heads), "exported_module": 1,
                       "why_one_token": "speculators feeds step k+1 the layer's output after final_layernorm; "
                                        "our modules read it before their norm, so only the first draft is ours"},
    }


def export_speculators(run_dir: str | Path, out: str | Path, verifier: str | None = None) -> Path:
    """Write a run's MTP heads as a speculators folder (config.json + model.safetensors).

    Args:
        run_dir: a run directory with sequential heads on a Qwen3-family backbone.
        out: the folder to write (new, empty, or an earlier such export).
        verifier: Hub id or folder of the backbone (the target vLLM loads); default: the folder
            the run was converted from.
    Returns:
        The folder. One-line `UserError`s for heads or backbones that do not map exactly
        (the module docstring lists them).
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: give --run a folder written by train, convert or retrofit")
    cfg = load_config(run_dir)  # every refusal below comes before the weights are read
    if cfg.heads.kind == "none":
        raise UserError(f"{run_dir} has no MTP heads to export: train or retrofit sequential heads first (--heads sequential:1)")
    layout = family(cfg.heads.kind).speculators_layout(cfg)
    if isinstance(layout, str):
        raise UserError(layout)
    why = backbone_problem(cfg)
    if why:
        raise UserError(why)
    spec_type, names = layout
    name_or_path, archs = resolve_verifier(run_dir, verifier, cfg)
    outdir.check(out, "speculators")
    model, _ = load_run(run_dir, with_tokenizer=False)
    with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as sf:
        stored = sf.get_slice(next(iter(sf.keys()))).get_dtype()
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
    heads = {n.removeprefix("mtp."): t for n, t in model.state_dict().items() if n.startswith("mtp.")}
    state = {names[n]: heads[n].detach().to(dtype).contiguous().cpu() for n in names}
    outdir.claim(out, "speculators")
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(out / "config.json", speculators_config(cfg, spec_type, name_or_path, archs, dtype))
    return out

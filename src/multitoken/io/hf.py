"""Hugging Face and GGUF interop: convert pretrained checkpoints in, export runs (heads included) out.

The native model's parameter names are Hugging Face's Llama names minus the ``model.`` prefix
(model.py), so the backbone maps by renaming alone; what this file adds is the exact mapping of
config fields, refusing what the native model cannot represent (one-line `UserError`s), and a
documented place for every MTP weight so that a round trip never loses a head.

``multitoken convert (--hf DIR | --gguf FILE) --out RUN_DIR [--dtype bf16|fp32] [--heads KIND:N]``
reads a local Llama / Qwen2 / Mistral folder (config.json + safetensors; pickled ``.bin`` files are
refused, never unpickled) or a GGUF file (through transformers, which dequantises it to fp32) and
writes a native run directory with the tokenizer. ``--heads`` adds fresh heads initialised from
the backbone (for a retrofit); heads stored in the folder (an exported run) come back as they were.

``multitoken export --run RUN_DIR --out HF_DIR`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads as a plain Llama (or Qwen2 / Mistral) model. The
MTP weights ride along in the same ``model.safetensors`` (transformers reports them as unused
weights and ignores them):

=============  ======================================================================================
heads          stored as (L = backbone layers, k = 0..D-1)
=============  ======================================================================================
sequential     DeepSeek-V3's layout: ``model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight``,
               ``model.layers.{L+k}.shared_head.norm.weight`` and the module's block under
               ``model.layers.{L+k}.{input_layernorm,self_attn,post_attention_layernorm,mlp}``.
               ``shared_head.head`` and the module's ``embed_tokens`` are omitted: they are the
               model's own LM head and embedding. config.json: ``num_nextn_predict_layers = D``
               (DeepSeek-V3's key) and ``num_mtp_layers = D`` (transformers' key).
parallel       ``mtp.parallel.{k}.*``: head k+2's block (Gloeckle et al.; head 1 is the model's own
               last block). The final norm and LM head are shared, so not repeated.
medusa         Medusa's own layout: ``medusa_head.{k}.{j}.linear.{weight,bias}`` for residual
               block j and ``medusa_head.{k}.{medusa_layers}.weight`` for the head's vocabulary
               projection. config.json: ``medusa_num_heads``, ``medusa_num_layers``.
=============  ======================================================================================

Every export's config.json also has a ``multitoken`` dict (``{"format": 1, "heads": {"kind",
"depth", "medusa_layers"}}``), which `convert --hf` reads to bring the heads back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from multitoken.config import HeadsConfig, ModelConfig, RopeScaling
from multitoken.errors import BadValue, UserError
from multitoken.io import outdir
from multitoken.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_run, read_json, save_run
from multitoken.io.outdir import atomic_write, write_json
from multitoken.model import Transformer
from multitoken.model.build import build_model, limit_context  # noqa: F401 (moved to model/; re-exported)
from multitoken.model.heads import family, kinds

SUPPORTED_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMAT_VERSION = 1
GEMMA = "gemma3_text"
log = logging.getLogger(__name__)


# ---- config ---------------------------------------------------------------------------------------


def _rope_scaling(p: dict[str, Any]) -> RopeScaling:
    """The native `RopeScaling` for one transformers rope dict (``rope_parameters`` or ``rope_scaling``)."""
    kind = p.get("rope_type", p.get("type")) or "default"
    keys = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind in keys:
        lacking = [k for k in keys[kind] if not isinstance(p.get(k), (int, float))]
        if lacking:
            raise UserError(f"rope_type {kind!r} needs numbers for {', '.join(lacking)}: fix config.json's rope_parameters")
        if kind == "default":
            return RopeScaling()
        if kind == "linear":
            return RopeScaling(kind="linear", factor=float(p["factor"]))
        return RopeScaling(kind="llama3", factor=float(p["factor"]), low_freq_factor=float(p["low_freq_factor"]),
                           high_freq_factor=float(p["high_freq_factor"]),
                           original_max_seq_len=int(p["original_max_position_embeddings"]))
    raise UserError(f"rope scaling {kind!r} is not supported: the native model has plain, linear and llama3 RoPE")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling, float]:
    """(global theta, global scaling, local theta) from transformers 5's ``rope_parameters`` (one dict,
    or one per layer type as Gemma-3 has) or the older top-level keys."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # per layer type
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full = {**(hf.get("rope_scaling") or {}), **params}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    if _rope_scaling(local).kind != "default":
        raise UserError("RoPE scaling on the sliding-window layers is not supported: only the global layers may scale")
    theta = full.get("rope_theta", hf.get("rope_theta"))
    return (float(theta) if theta is not None else 10000.0), _rope_scaling(full), float(local.get("rope_theta", 10000.0))


def _local_layers(hf: dict[str, Any], model_type: str) -> list[int]:
    """Indices of the sliding-window layers that are in use (Gemma-3 always; Qwen2/3 when enabled)."""
    layer_types = hf.get("layer_types") or []
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return []
        n = int(hf["num_hidden_layers"])
        return [i for i in range(n) if i >= int(hf.get("max_window_layers") or 0)] if not layer_types else \
            [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if model_type == GEMMA:
        if not layer_types:  # older configs give the pattern: every N-th layer is global
            every = int(hf.get("sliding_window_pattern") or 6)
            layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
        return [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    return [] if hf.get("sliding_window") is None else list(range(int(hf["num_hidden_layers"])))  # Mistral: every layer


def _max_seq_len(hf: dict[str, Any], local: list[int]) -> int:
    """max_position_embeddings, capped to the sliding window where some layer uses one.

    Within the window, sliding-window attention *is* full causal attention, so capping the
    sequence length keeps the model exact instead of approximating a window we do not implement.
    """
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window") if local else None
    if window is not None and int(window) < max_pos:
        log.info("sliding_window=%s < max_position_embeddings=%s: max_seq_len capped to %s, where full attention equals the window",
                 window, max_pos, window)
        return int(window)
    return max_pos


def eos_ids_from_hf(hf: dict[str, Any]) -> list[int]:
    """Every end-of-sequence id of a config (``eos_token_id`` may be one id or a list)."""
    eos = hf.get("eos_token_id")
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return list(dict.fromkeys(int(i) for i in ids))


def config_from_hf(hf: dict[str, Any], heads: HeadsConfig | None = None, eos_id: int | None = None) -> ModelConfig:
    """The native `ModelConfig` for a Hugging Face config.json dict.

    Args:
        hf: the parsed config.json.
        heads: the MTP heads (default: none).
        eos_id: the end-of-sequence id (default: the config's first ``eos_token_id``, else 0); every
            id of the config's list stops generation (``eos_ids``).
    Returns:
        The config; raises `UserError` naming what is supported for anything it cannot represent.
    """
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        raise UserError("model_type 'gemma3' is the multimodal Gemma-3 (vision tower): convert the text model "
                        "(model_type 'gemma3_text', e.g. gemma-3-270m or gemma-3-1b)")
    if model_type not in SUPPORTED_TYPES:
        raise UserError(f"model_type {model_type!r} is not supported: convert handles {', '.join(SUPPORTED_TYPES)} checkpoints")
    gemma = model_type == GEMMA
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in acts:
        raise UserError(f"hidden_act {act!r} is not supported: the native MLP is gated with silu or gelu_pytorch_tanh")
    if model_type not in ("qwen2",) and hf.get("attention_bias"):
        raise UserError(f"{model_type} with attention_bias=true (bias on o_proj too) is not supported: only q/k/v biases (Qwen2) map")
    if hf.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported: the native MLP has no biases")
    if int(hf.get("pretraining_tp") or 1) != 1:
        raise UserError("pretraining_tp > 1 is not supported: re-save the checkpoint with pretraining_tp=1")
    if gemma and hf.get("use_bidirectional_attention"):
        raise UserError("use_bidirectional_attention=true (EmbeddingGemma) is not supported: convert a causal Gemma-3 model")
    n_heads = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    eos_ids = eos_ids_from_hf(hf)
    if eos_id is None:
        eos_id = eos_ids[0] if eos_ids else 0
    stop = list(dict.fromkeys([eos_id, *eos_ids]))  # the document separator first
    eos_ids = stop if len(stop) > 1 else []
    theta, scaling, local_theta = _rope(hf)
    local = _local_layers(hf, model_type)
    max_seq_len = _max_seq_len(hf, local)
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]),
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        # Mistral's and Qwen's windows keep one RoPE base; only Gemma's local layers have their own.
        local_layers=local if gemma else [],
        rope_local_theta=local_theta if gemma else 10000.0,
        sliding_window=max_seq_len if gemma else 0,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_plus_one=gemma,
        qk_norm=model_type in ("qwen3", GEMMA),
        sandwich_norms=gemma,
        hidden_act=acts[act],
        scale_embeddings=gemma,
        attn_scale=float(hf.get("query_pre_attn_scalar") or head_dim) ** -0.5 if gemma else 0.0,
        # transformers' Gemma-3 attention never applies attn_logit_softcapping; the final cap it does.
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),  # Llama/Qwen/Mistral default to untied, Gemma to tied
        attention_bias=model_type == "qwen2",
        eos_id=eos_id,
        eos_ids=eos_ids,
        heads=heads or HeadsConfig(),
    )


def family_of(cfg: ModelConfig) -> str:
    """The transformers model type that represents `cfg` (the features decide, not a name)."""
    if cfg.sandwich_norms:
        return GEMMA
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attention_bias else "llama"


def _rope_dict(theta: float, s: RopeScaling) -> dict[str, Any]:
    d: dict[str, Any] = {"rope_type": s.kind, "rope_theta": theta}
    if s.kind != "default":
        d["factor"] = s.factor
    if s.kind == "llama3":
        d.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                 original_max_position_embeddings=s.original_max_seq_len)
    return d


def config_to_hf(cfg: ModelConfig, model_type: str, dtype: torch.dtype, bos_id: int | None = None) -> dict[str, Any]:
    """A config.json dict for `cfg` that transformers reads as `model_type` (heads described too).

    A `model_type` that cannot represent `cfg` (Llama asked for a model with q/k norms, say) gives
    way to the one that does (`family_of`); Mistral is Llama's layout under another name.
    """
    if model_type not in SUPPORTED_TYPES:
        raise UserError(f"cannot export as {model_type!r}: choose one of {', '.join(SUPPORTED_TYPES)}")
    if family_of(cfg) != (model_type if model_type != "mistral" else "llama"):
        model_type = family_of(cfg)
    gemma = model_type == GEMMA
    eos = cfg.stop_ids
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        ("hidden_activation" if gemma else "hidden_act"): {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.hidden_act],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "bos_token_id": bos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if gemma:
        hf.update(rope_parameters={"full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
                                   "sliding_attention": _rope_dict(cfg.rope_local_theta, RopeScaling())},
                  layer_types=["sliding_attention" if i in cfg.local_layers else "full_attention" for i in range(cfg.n_layers)],
                  sliding_window=cfg.sliding_window or cfg.max_seq_len, attention_bias=False,
                  query_pre_attn_scalar=round((cfg.attn_scale or cfg.head_dim ** -0.5) ** -2),  # transformers wants an int
                  final_logit_softcapping=cfg.final_logit_softcap or None, attn_logit_softcapping=None)
    else:
        # Both spellings: transformers 5 reads rope_parameters, older releases rope_theta / rope_scaling.
        hf.update(rope_theta=cfg.rope_theta, rope_parameters=_rope_dict(cfg.rope_theta, cfg.rope_scaling))
        if cfg.rope_scaling.kind != "default":
            hf["rope_scaling"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                  layer_types=["full_attention"] * cfg.n_layers, attention_bias=cfg.attention_bias)
    elif model_type == "mistral":
        hf.update(sliding_window=None)
    h = cfg.heads
    if h.kind != "none":
        hf.update(family(h.kind).hf_config(cfg, hf))
    hf["multitoken"] = {"format": FORMAT_VERSION, "heads": {"kind": h.kind, "depth": h.depth, "medusa_layers": h.medusa_layers,
                                                               **({"shared": True} if h.shared else {})}}
    return hf


def heads_from_hf(hf: dict[str, Any]) -> HeadsConfig:
    """The heads an exported folder carries: its ``multitoken`` dict, else DeepSeek's ``num_nextn_predict_layers``."""
    mt = hf.get("multitoken")
    if isinstance(mt, dict) and isinstance(mt.get("heads"), dict):
        if int(mt.get("format", 0)) > FORMAT_VERSION:
            raise UserError(f"config.json's multitoken format {mt['format']} is newer than this release reads ({FORMAT_VERSION}): upgrade multitoken")
        return HeadsConfig(**mt["heads"])
    for kind in kinds():
        found = family(kind).heads_from_hf(hf)
        if found is not None:
            return found
    return HeadsConfig()


# ---- weights --------------------------------------------------------------------------------------


def native_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """The Hugging Face (export) name of native parameter `name` (layout in the module docstring)."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        return family(cfg.heads.kind).export_name(name.removeprefix("mtp."), cfg)  # each family names its own
    return "model." + name


def state_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their export names (tied LM head stored once, as the embedding)."""
    state = {native_to_hf_name(name, model.config): t.detach().contiguous().cpu()
             for name, t in model.weights_to_store(model.state_dict()).items()}
    cfg = model.config
    if cfg.heads.kind != "none":
        state.update(family(cfg.heads.kind).export_copies(state, cfg))
    return state


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, fresh_heads: bool = False) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict to native names; every tensor must find a place.

    Args:
        hf_state: tensors by Hugging Face name.
        cfg: the native config (its heads decide where MTP weights go).
        fresh_heads: the heads are new (a retrofit), so the checkpoint does not hold them.
    Returns:
        The native state dict (no ``lm_head.weight`` when tied). Raises `UserError` listing any
        tensor that has no native counterpart or any native weight that is missing: nothing is
        silently dropped.
    """
    with torch.device("meta"):
        shape = Transformer(cfg)  # names only
    model_names = shape.missing_weights(list(shape.state_dict()))  # a tied LM head is not a weight of its own
    reverse = {native_to_hf_name(n, cfg): n for n in model_names}
    out: dict[str, torch.Tensor] = {}
    unused = []
    for name, t in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints stored the RoPE table; it is recomputed from rope_theta
        if name in reverse:
            out[reverse[name]] = t
            continue
        copy = family(cfg.heads.kind).shared_copy(name, cfg) if cfg.heads.kind != "none" else None
        if copy is not None:
            # Layouts that repeat a tensor (DeepSeek's embedding / LM head per MTP module, a shared
            # module written once per depth): accept the repeats only when they really are copies.
            shared, why = copy
            ref = hf_state.get(shared, hf_state.get("model.embed_tokens.weight") if shared == "lm_head.weight" else None)
            if ref is not None and torch.equal(ref, t):
                continue
            raise UserError(f"{name} differs from {shared}: {why}")
        if name == "lm_head.weight" and cfg.tie_embeddings:
            if not torch.equal(t, hf_state["model.embed_tokens.weight"]):
                raise UserError("tie_word_embeddings is true but lm_head.weight differs from the embedding: fix config.json")
            continue
        unused.append(name)
    if unused:
        raise UserError(f"{len(unused)} weight(s) have no place in a {cfg.heads} model (e.g. {', '.join(sorted(unused)[:3])}): "
                        f"not a plain {', '.join(SUPPORTED_TYPES)} checkpoint or an export of one")
    missing = shape.missing_weights([n for n in model_names if n not in out], heads=not fresh_heads)
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} weight(s) (e.g. {', '.join(missing[:3])}): incomplete or not a Llama-family checkpoint")
    return out


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (one file or an indexed set of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in read_json(index)["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickled:
            raise UserError(f"{folder} has only pickled weights ({pickled[0]}), which multitoken never loads: re-save them as safetensors "
                            "(save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{folder} has no .safetensors weights: point --hf at a Hugging Face model folder")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
        except (SafetensorError, OSError) as e:  # garbage or truncated: one line naming the file
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"{f} is damaged ({reason}): restore the model folder's weights") from None
    return state


# ---- convert --------------------------------------------------------------------------------------


def _load_tokenizer(path: Path, eos_id: int | None, tokenizer: str | None):
    """The run's tokenizer, its EOS token forced to the model's ``eos_token_id`` so that data
    preparation (document separators), the loss and generation all agree on one id."""
    from multitoken.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer or path)
    if eos_id is not None and tok.eos_id != eos_id:
        token = tok.id_to_token(eos_id)
        if token is None:
            raise UserError(f"eos_token_id {eos_id} is not in the tokenizer's vocabulary: fix config.json or pass --tokenizer")
        tok = Tokenizer.load(tokenizer or path, eos_token=token)
    return tok


def _config_eos(hf: dict[str, Any]) -> int | None:
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None


def _resolve_heads(stored: HeadsConfig, asked: HeadsConfig | None, where: str) -> tuple[HeadsConfig, bool]:
    """(heads, fresh): the folder's own heads, or new ones when it has none."""
    if stored.kind != "none":
        if asked is not None and asked.kind != "none" and (asked.kind, asked.depth) != (stored.kind, stored.depth):
            raise UserError(f"{where} already carries {stored} heads: drop --heads {asked} (or export the run without heads first)")
        return stored, False
    return (asked or HeadsConfig()), bool(asked and asked.kind != "none")


def load_hf(hf_dir: str | Path, heads: HeadsConfig | None = None, tokenizer: str | None = None,
            max_seq_len: int | None = None) -> tuple[Transformer, Any, dict[str, Any]]:
    """The native model (fp32, eval mode) and tokenizer of a local Hugging Face folder, in memory.

    Args:
        hf_dir: folder with config.json, safetensors weights and tokenizer files (an export of ours too).
        heads, tokenizer, max_seq_len: as for `convert_hf`.
    Returns:
        (model, tokenizer, config.json dict).
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} has no config.json: point --hf at a Hugging Face model folder (or use --gguf for a .gguf file)")
    hf = read_json(hf_dir / "config.json")
    if not isinstance(hf, dict):
        raise UserError(f"{hf_dir / 'config.json'} holds {type(hf).__name__}, not an object: restore the model folder's config.json")
    gen = hf_dir / "generation_config.json"
    with _config_errors(hf_dir / "config.json"):
        if gen.is_file():  # instruct models list their end-of-turn ids there (Llama-3.x, Gemma-3)
            hf = {**hf, "eos_token_id": list(dict.fromkeys(eos_ids_from_hf(hf) + eos_ids_from_hf(read_json(gen))))}
    state = read_safetensors_folder(hf_dir)
    with _config_errors(hf_dir / "config.json"):
        model_heads, fresh = _resolve_heads(heads_from_hf(hf), heads, str(hf_dir))
        eos = _config_eos(hf)
    tok = _load_tokenizer(hf_dir, eos, tokenizer)
    with _config_errors(hf_dir / "config.json"):
        cfg = config_from_hf(hf, model_heads, eos_id=tok.eos_id)
    model = build_model(cfg, state_from_hf(state, cfg, fresh), fresh)
    if max_seq_len:
        limit_context(model, max_seq_len)
    hf["_all_bf16"] = all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    return model, tok, hf


def from_transformers(hf_model, heads: HeadsConfig | None = None) -> Transformer:
    """The native model (fp32, eval mode, on the same device) of a loaded transformers model, in memory.

    No folder is written or read: the config maps through `config_from_hf` and the weights by
    name (`state_from_hf`), so a model someone already holds decodes with our engine and heads.

    Args:
        hf_model: a transformers ``*ForCausalLM`` of a supported family.
        heads: fresh heads to add (initialised from the backbone); default none.
    """
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise UserError(f"{type(hf_model).__name__} is not a transformers model: give an AutoModelForCausalLM")
    hf = hf_model.config.to_dict()
    model_heads, fresh = _resolve_heads(heads_from_hf(hf), heads, type(hf_model).__name__)
    cfg = config_from_hf(hf, model_heads)
    device = next(hf_model.parameters()).device
    return build_model(cfg, state_from_hf(hf_model.state_dict(), cfg, fresh), fresh).to(device)


def convert_hf(hf_dir: str | Path, out: str | Path, dtype: str | None = None, heads: HeadsConfig | None = None,
               tokenizer: str | None = None, max_seq_len: int | None = None) -> Path:
    """Convert a local Hugging Face folder (safetensors; any of `SUPPORTED_TYPES`) into a run directory.

    Args:
        hf_dir: folder with config.json, safetensors weights and tokenizer files.
        out: the run directory to write.
        dtype: 'fp32' or 'bf16'; default keeps the checkpoint's own (fp32 unless all weights are bf16).
        heads: new MTP heads to add (initialised from the backbone); heads the folder already
            carries (a `multitoken export`) are restored as they are.
        tokenizer: a tokenizer path when the folder has none.
        max_seq_len: a shorter context than the checkpoint's (see `limit_context`).
    Returns:
        The run directory.
    """
    hf_dir = Path(hf_dir)
    outdir.check(out, "convert")  # before the slow part: a folder holding someone else's files is refused
    model, tok, hf = load_hf(hf_dir, heads, tokenizer, max_seq_len)
    if dtype is None:
        dtype = "bf16" if hf["_all_bf16"] else "fp32"
    return _save(model, tok, out, dtype, source={"format": "hf", "path": str(hf_dir.resolve()), "model_type": hf["model_type"]})


@contextlib.contextmanager
def _config_errors(path: Path) -> Iterator[None]:
    """A missing key or a value of the wrong type in a Hugging Face config.json as one line naming it."""
    try:
        yield
    except KeyError as e:
        raise UserError(f"{path} lacks {e}: restore the model folder's config.json") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} holds a value of the wrong kind ({e}): restore the model folder's config.json") from None


def convert_gguf(gguf_file: str | Path, out: str | Path, dtype: str | None = None, heads: HeadsConfig | None = None,
                 hf_model=None, max_seq_len: int | None = None) -> Path:
    """Convert a GGUF file (read and dequantised by transformers) into a run directory.

    Args:
        gguf_file: the .gguf file (transformers, gguf and accelerate must be installed).
        out: the run directory to write.
        dtype: 'fp32' (default: the dequantised values exactly) or 'bf16'.
        heads: new MTP heads to add, initialised from the backbone.
        hf_model: the file already loaded by `load_gguf_transformers` (saves reading it twice).
        max_seq_len: a shorter context than the file's (see `limit_context`).
    Returns:
        The run directory.
    """
    outdir.check(out, "convert")
    hf_model = hf_model if hf_model is not None else load_gguf_transformers(gguf_file)
    hf = hf_model.config.to_dict()
    tok = _load_tokenizer(Path(gguf_file), _config_eos(hf), None)
    model_heads, fresh = _resolve_heads(HeadsConfig(), heads, str(gguf_file))
    cfg = config_from_hf(hf, model_heads, eos_id=tok.eos_id)
    model = build_model(cfg, state_from_hf(hf_model.state_dict(), cfg, fresh), fresh)
    if max_seq_len:
        limit_context(model, max_seq_len)
    return _save(model, tok, out, dtype or "fp32",
                 source={"format": "gguf", "path": str(Path(gguf_file).resolve()), "model_type": hf["model_type"]})


def load_gguf_transformers(gguf_file: str | Path):
    """The transformers model for a GGUF file (fp32, eval mode); a one-line error when it cannot load."""
    p = Path(gguf_file)
    if not p.is_file():
        raise UserError(f"{p} does not exist: give the path of a .gguf file")
    try:
        import accelerate  # noqa: F401  transformers needs it for GGUF and says so less clearly
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UserError(f"reading GGUF needs transformers, gguf and accelerate ({e.name} is missing): pip install 'multitoken[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"transformers cannot load {p} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        f"convert supports {', '.join(SUPPORTED_TYPES)} GGUF files") from None
    return model.eval()


def _save(model: Transformer, tok, out: str | Path, dtype: str, source: dict[str, Any]) -> Path:
    if dtype not in DTYPES:
        raise BadValue("dtype", repr(dtype), f"choose one of {', '.join(DTYPES)}")
    model = model.to(DTYPES[dtype])
    outdir.claim(out, "convert")
    save_run(out, model, tok, extra={"source": {**source, "dtype": dtype}})
    return Path(out)


# ---- export ---------------------------------------------------------------------------------------


def export_hf(run_dir: str | Path, out: str | Path, model_type: str | None = None) -> Path:
    """Write a run as a Hugging Face folder: config.json, model.safetensors (heads included), tokenizer.

    Args:
        run_dir: a run directory.
        out: the folder to write: new, empty, or an earlier export (whose files are replaced).
        model_type: 'llama', 'qwen2' or 'mistral'; default: the converted source's type, else
            'qwen2' for a model with attention biases and 'llama' otherwise.
    Returns:
        The folder.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must differ from --run: export writes Hugging Face files next to nothing of the run")
    outdir.check(out, "export")
    cfg = load_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else None  # (load_run words a missing one)
    problem = family(cfg.heads.kind).hf_export_problem(cfg) if cfg is not None and cfg.heads.kind != "none" else None
    if problem:  # before the weights are read or anything is written
        raise UserError(problem)
    model, tok = load_run(run_dir, with_tokenizer=(run_dir / "tokenizer.json").is_file())
    with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as sf:
        dtype = sf.get_slice(next(iter(sf.keys()))).get_dtype()
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    model = model.to(dtype)
    source = read_json(run_dir / CONFIG_FILE).get("source") or {}
    mt = model_type or source.get("model_type") or ("qwen2" if model.config.attention_bias else "llama")
    bos = tok.bos_id if tok is not None else None
    outdir.claim(out, "export")
    state = state_to_hf(model)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(out / "config.json", config_to_hf(model.config, mt, dtype, bos))
    eos = model.config.stop_ids
    write_json(out / "generation_config.json", {"eos_token_id": eos if len(eos) > 1 else eos[0], "bos_token_id": bos})
    if tok is not None:
        tok.save(out)
    return out


def load_transformers_mtp(hf_dir: str | Path, **kwargs):
    """transformers' model for a folder `export` wrote with sequential heads, ready for
    ``model.generate(..., use_mtp=True)`` (transformers' own MTP drafting with our modules).

    The exported config already says how many MTP layers there are and that they read the hidden
    state before the final norm; what a Llama-type model lacks is the pattern under which
    transformers looks up MTP weights (`model.layers.{L+k}.*`), set here on the instance.

    Args:
        hf_dir: the exported folder.
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (dtype, device_map, ...).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs)
    n = getattr(model.config, "num_mtp_layers", None)
    if not n:
        raise UserError(f"{hf_dir} has no MTP layers (num_mtp_layers): export a run with sequential heads")
    L = model.config.num_hidden_layers
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(n)]
    return model

"""Model operations on whole models: build one holding given weights, shorten its context.

(They lived in io/hf.py, which re-exports them; a model is built the same way from a Hugging
Face folder, a run directory with new heads, or a heads file attached to a pretrained model.)
"""

from __future__ import annotations

import torch

from multitoken.config import ModelConfig
from multitoken.errors import BadValue
from multitoken.model.transformer import Transformer


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], fresh_heads: bool) -> Transformer:
    """A native model holding `state`; with `fresh_heads`, the heads start from the backbone."""
    model = Transformer.empty(cfg)
    model.init_weights()  # RoPE buffers and random head weights, before the real weights land
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = model.missing_weights(result.missing_keys, heads=False)
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    if fresh_heads:
        model.init_heads_from_backbone()
    return model.eval()


def limit_context(model: Transformer, max_seq_len: int) -> Transformer:
    """Shorten the model's context to `max_seq_len` in place (positions below it are unchanged).

    The static KV cache holds ``max_seq_len`` slots and every decoding step attends over all of
    them (masked), so a pretrained 8k context makes each step of a short generation pay for 8k
    keys; a context sized to the job (e.g. 1024) keeps the outputs identical and the steps cheap.
    """
    if not 1 <= max_seq_len <= model.config.max_seq_len:
        raise BadValue("max_seq_len", max_seq_len, f"choose between 1 and the model's {model.config.max_seq_len}")
    model.config.max_seq_len = max_seq_len
    for name in model._rope_names():
        setattr(model, name, getattr(model, name)[:max_seq_len].clone())
    return model

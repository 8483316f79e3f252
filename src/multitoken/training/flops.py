"""FLOPs per trained token of a model: what `bench train` compares tokens/s against and what
the study (multitoken.experiments) uses to give every configuration equal compute."""

from __future__ import annotations


def train_flops(model, seq_len: int, causal: bool = True) -> dict[str, float]:
    """FLOPs per trained token of `model` at context `seq_len` (the formula: bench/train.py's docstring).

    Returns:
        {"model": FLOPs the model needs, "recompute": extra FLOPs of recomputed head blocks,
         "total": their sum}.
    """
    cfg = model.config
    V, d, D = cfg.vocab_size, cfg.dim, model.depth
    skip = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    heads = model.mtp
    head_params = 0
    matrix_params = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or id(p) in skip or name.endswith("lm_head.weight"):
            continue  # embeddings are lookups; vocabulary projections are counted per depth below
        matrix_params += p.numel()
        if name.startswith("mtp."):
            head_params += p.numel()
    head_blocks = sum(1 for m in heads.modules() if hasattr(m, "self_attn")) if heads is not None else 0
    if cfg.heads.shared:  # one module's weights, run at every depth; what lies outside it (a fused input's fc) runs once
        module = sum(p.numel() for unit in heads.fsdp_units() for p in unit.parameters() if p.dim() == 2)
        matrix_params, head_params, head_blocks = matrix_params + (D - 1) * module, head_params + (D - 1) * module, D * head_blocks
    blocks = cfg.n_layers + head_blocks
    attn = (3 if causal else 6) * 2 * d * seq_len  # per block and token, forward + backward
    model_flops = 6 * (matrix_params + (1 + D) * V * d) + attn * blocks
    recompute = 0.0
    if heads is not None and getattr(heads, "recompute", False):
        recompute = 2 * head_params + attn / 3 * head_blocks
    return {"model": float(model_flops), "recompute": float(recompute), "total": float(model_flops + recompute)}

"""transformers' custom_generate entry: ``model.generate(ids, custom_generate=multitoken.pipeline.CUSTOM_GENERATE_DIR,
trust_remote_code=True, heads="heads.safetensors", max_new_tokens=64)`` decodes a loaded transformers
model self-speculatively with multitoken's heads (no conversion to a folder; `pipeline.hf_generate`).
"""

from multitoken.pipeline import hf_generate


def generate(model, inputs=None, input_ids=None, generation_config=None, heads=None, max_new_tokens=None, **kwargs):
    """transformers calls this with every argument of its own ``generate``; ours are picked out."""
    ids = input_ids if input_ids is not None else inputs
    n = max_new_tokens or getattr(generation_config, "max_new_tokens", None) or 20
    ours = {k: kwargs[k] for k in ("mode", "temperature", "top_k", "top_p", "seed", "draft", "eos_token_id") if k in kwargs}
    return hf_generate(model, ids, heads=heads, max_new_tokens=n, **ours)
